"""Recipes: every one loads, builds on the meta device, lands within 5% of its nominal size; the `info` command;
config errors name the key."""

import json
import re
from pathlib import Path

import pytest
import torch

from titans_train.cli import main
from titans_train.config import ModelConfig, load_recipe, model_config
from titans_train.models.info import describe
from titans_train.models.lm import build_model

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
VARIANTS = ["lmm", "mac", "mag", "mal", "transformer"]
SCALES = {"170m": 170e6, "340m": 340e6, "400m": 400e6, "760m": 760e6}


@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_recipe_counts_within_5_percent_of_nominal(variant, scale):
    path = RECIPES / f"{variant}_{scale}.yaml"
    cfg = model_config(load_recipe(path))
    assert cfg.variant == variant
    assert (cfg.vocab_size, cfg.max_seq_len) == (32000, 4096)
    if variant != "transformer":
        assert cfg.memory.chunk_size == 16
    if variant in ("mag", "mal"):
        assert cfg.window == 2048 and cfg.n_persistent == 128
    if variant == "mac":
        assert cfg.segment_len == 512 and cfg.n_persistent == 128
    with torch.device("meta"):
        model = build_model(cfg)
    n = model.count_params()
    assert abs(n / SCALES[scale] - 1) <= 0.05, f"{path.name}: {n / 1e6:.1f}M parameters"


def test_every_recipe_is_covered_and_builds():
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    expected = {f"{v}_{s}" for v in VARIANTS for s in SCALES} | {f"tiny_{v}" for v in VARIANTS}
    assert expected <= set(names), sorted(expected - set(names))


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_recipes_are_a_few_million_parameters(variant):
    cfg = model_config(load_recipe(RECIPES / f"tiny_{variant}.yaml"))
    assert cfg.variant == variant
    model = build_model(cfg)  # real tensors: the tiny ones train on CPU
    assert 1e6 <= model.count_params() <= 10e6
    logits, _ = model(torch.randint(0, cfg.vocab_size, (1, 70)))
    assert logits.shape == (1, 70, cfg.vocab_size)


def test_channel_alpha_override_builds():
    """`model.memory.channel_alpha=true` reaches every NeuralMemory: head_dim alphas per head, counted, and it runs."""
    base = model_config(load_recipe(RECIPES / "tiny_mag.yaml"))
    cfg = model_config(load_recipe(RECIPES / "tiny_mag.yaml", ["model.memory.channel_alpha=true"]))
    assert cfg.memory.channel_alpha and not base.memory.channel_alpha
    torch.manual_seed(0)
    model = build_model(cfg)
    memories = [m for m in model.modules() if type(m).__name__ == "NeuralMemory"]
    assert memories and all(m.channel_alpha for m in memories)
    heads, head_dim = cfg.memory_heads(), cfg.dim // cfg.memory_heads()
    extra = cfg.n_layers * heads * (head_dim - 1) * (cfg.dim + 1)  # rate map: head_dim - 1 more outputs per head
    assert model.count_params() == build_model(base).count_params() + extra
    assert model.flops_per_token(64) > build_model(base).flops_per_token(64)
    logits, state = model(torch.randint(0, cfg.vocab_size, (1, 21)))
    assert logits.shape == (1, 21, cfg.vocab_size) and torch.isfinite(logits).all()
    assert describe(str(RECIPES / "tiny_mag.yaml"), ["model.memory.channel_alpha=true"])["memory"]["channel_alpha"]


def test_info_json_and_table(capsys):
    assert main(["info", str(RECIPES / "mag_170m.yaml"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["variant"] == "mag"
    assert facts["n_params"] > facts["n_params_non_embedding"] > 0
    assert facts["flops_per_token"] > 6 * facts["n_params_non_embedding"]
    assert main(["info", str(RECIPES / "mag_170m.yaml"), "model.n_layers=2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"n_layers\s+2", out) and "flops_per_token" in out


def test_info_reports_bad_override(capsys):
    assert main(["info", str(RECIPES / "mag_170m.yaml"), "model.windwo=12"]) == 2
    err = capsys.readouterr().err
    assert "model.windwo" in err and "did you mean model.window" in err


def test_flops_formula_pieces():
    # Transformer++ at seq_len 1: 6 x (matmul weights) + attention over one key per layer.
    cfg = ModelConfig(variant="transformer", vocab_size=100, dim=64, n_layers=2, heads=4, window=None,
                      n_persistent=0, max_seq_len=128, mlp_hidden=128)
    model = build_model(cfg)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed"))
    assert model.flops_per_token(1) == 3 * (2 * matmul + 2 * 4 * 64 * 1)
    # full causal attention cost grows with length, sliding window stops growing at the window
    assert model.flops_per_token(128) > model.flops_per_token(64)
    swa = build_model(ModelConfig(**{**cfg.__dict__, "window": 16}))
    assert swa.flops_per_token(128) < model.flops_per_token(128)
    assert describe(str(RECIPES / "mac_170m.yaml"), [])["flops_per_token"] > 0


# --- config errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.heads=5"], "model.heads=5 does not divide model.dim=768"),
        (["model.variant=mamba"], "model.variant='mamba' is not a known variant; choose one of lmm, mac, mag, mal, transformer"),
        (["model.window=8192"], "model.window=8192 is larger than model.max_seq_len=4096"),
        (["model.dimm=5"], "unknown key model.dimm; did you mean model.dim?"),
        (["model.memory.chunksize=8"], "unknown key model.memory.chunksize; did you mean model.memory.chunk_size?"),
        (["model.dim=wide"], "model.dim='wide' must be of type int"),
        (["model.n_layers=0"], "model.n_layers=0 must be a positive integer"),
        (["model.mac_memory_tokens=100"], "model.mac_memory_tokens=100 must be >= 1 and divide model.segment_len=512"),
        (["model.gate=relu"], "model.gate='relu' is not one of sigmoid, silu"),
        (["model.memory.heads=7"], "model.memory.heads=7 does not divide model.dim=768"),
        (["model.memory.momentum_form=adam"], "model.memory.momentum_form='adam' must be one of plain, ema"),
        (["model.segment_len=8192"], "model.segment_len=8192 is larger than model.max_seq_len=4096"),
    ],
)
def test_bad_model_config_names_the_key(overrides, message):
    recipe = "mac_170m.yaml" if "mac" in overrides[0] or "segment" in overrides[0] else "mag_170m.yaml"
    with pytest.raises(ValueError) as e:
        model_config(load_recipe(RECIPES / recipe, overrides))
    assert message in str(e.value)


def test_window_none_only_for_transformer():
    with pytest.raises(ValueError, match="model.window must be set for variant mal"):
        ModelConfig(variant="mal", window=None)
    ModelConfig(variant="transformer", window=None)  # full attention is fine


def test_unknown_top_level_sections_are_left_alone(tmp_path):
    (tmp_path / "r.yaml").write_text(
        f"defaults: [{RECIPES / 'tiny_lmm.yaml'}]\ndata: {{path: somewhere}}\nmodel: {{dim: 128}}\n")
    recipe = load_recipe(tmp_path / "r.yaml", ["model.n_layers=2"])
    assert recipe["data"]["path"] == "somewhere"  # merged over base/tiny.yaml's CPU data section
    cfg = model_config(recipe)
    assert (cfg.variant, cfg.dim, cfg.n_layers) == ("lmm", 128, 2)


def test_recipe_composition_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ValueError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("defaults: [missing.yaml]\n")
    with pytest.raises(ValueError, match="missing.yaml"):
        load_recipe(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("model: {variant: lmm}\n")
    with pytest.raises(ValueError, match="key=value"):
        load_recipe(tmp_path / "d.yaml", ["model.dim"])
