"""lm-eval adapter: streamed log-likelihoods equal one full forward (float64), and small tasks built here (no
download) run through the harness's own evaluator (`lm_eval.simple_evaluate`) with the metrics we recompute."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from tests.train_models import tiny_titans  # noqa: E402
from titans_train.data.tokenizer import ByteTokenizer  # noqa: E402
from titans_train.eval.lm_eval_adapter import TitansEvalLM, run_lm_eval  # noqa: E402

TOK = ByteTokenizer()
DOCS = [
    {"context": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"context": "Two plus two is", "choices": [" four", " five"], "answer": 0},
    {"context": "", "choices": ["cats", "dogs and more dogs"], "answer": 1},
    {"context": "A long context " * 5 + "ends with", "choices": [" a", " b", " c", " d"], "answer": 2},
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_titans("mag", vocab_size=257).double().eval()


def full_logprob(model, context: str, cont: str) -> tuple[float, bool]:
    """Reference: one forward over context + continuation, no state, no pieces."""
    ctx = list(TOK.encode(context)) or [TOK.eos_id]
    ids = torch.tensor(ctx + list(TOK.encode(cont)))
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
    lp = F.log_softmax(logits[0, len(ctx) - 1:], -1)
    target = ids[len(ctx):]
    return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def test_streamed_loglikelihood_equals_full_forward(model):
    lm = TitansEvalLM(model, TOK, piece_len=5)
    reqs = [SimpleNamespace(args=(d["context"], c)) for d in DOCS for c in d["choices"]]
    for req, (lp, greedy) in zip(reqs, lm.loglikelihood(reqs)):
        ref_lp, ref_greedy = full_logprob(model, *req.args)
        assert abs(lp - ref_lp) <= 1e-8 and greedy == ref_greedy
    (rolling,) = lm.loglikelihood_rolling([SimpleNamespace(args=("some text to score",))])
    assert abs(rolling - full_logprob(model, "", "some text to score")[0]) <= 1e-8
    (text,) = lm.generate_until([SimpleNamespace(args=("The sky", {"until": ["\n"], "max_gen_toks": 6}))])
    out = model.generate(torch.tensor([list(TOK.encode("The sky"))]), 6, temperature=0)
    assert text == TOK.decode(out[0, 7:].tolist()).split("\n")[0]


def write_tasks(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "choice.yaml").write_text(
        "task: titans_local_choice\n" + common + "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "gen.yaml").write_text(
        "task: titans_local_gen\n" + common + "output_type: generate_until\n"
        "doc_to_text: '{{context}}'\ndoc_to_target: '{{choices[answer]}}'\ntarget_delimiter: ''\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n")


def test_local_tasks_through_the_harness_evaluator(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(tmp_path)
    r = run_lm_eval(model, TOK, ["titans_local_choice", "titans_local_gen"], include_path=str(tmp_path),
                    piece_len=7)
    expected = sum(max(range(len(d["choices"])), key=lambda i: full_logprob(model, d["context"], d["choices"][i])[0])
                   == d["answer"] for d in DOCS) / len(DOCS)
    acc = r["results"]["titans_local_choice"]["acc,none"]
    assert math.isclose(acc, expected), (acc, expected)
    assert 0.0 <= r["results"]["titans_local_gen"]["exact_match,none"] <= 1.0


def test_cli_lm_eval_on_an_export(tmp_path, monkeypatch, capsys):
    """`titans-train eval EXPORT --task lm-eval --tasks ... --include-path DIR` (an unknown task is a one-line error
    too, but finding out indexes the harness's thousands of tasks: minutes, so not tested here)."""
    from safetensors.torch import save_model

    from titans_train.cli import main
    from titans_train.train import build as B

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(tmp_path)
    recipe, resolved = B.load_recipe("recipes/tiny_niah_mag.yaml", ["model.dim=32", "model.n_layers=1"])
    export = tmp_path / "export"
    export.mkdir()
    save_model(B.build_model(recipe), str(export / "model.safetensors"))
    (export / "recipe.yaml").write_text(B.recipe_yaml(resolved))
    (export / "tokenizer.json").write_text(TOK.serialize())
    assert main(["eval", str(export), "--task", "lm-eval", "--tasks", "titans_local_choice", "--include-path",
                 str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "lm-eval.json").read_text())
    assert 0 <= res["results"]["titans_local_choice"]["acc,none"] <= 1
    assert "titans_local_choice: acc" in capsys.readouterr().out
