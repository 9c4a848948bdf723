"""EleutherAI lm-evaluation-harness on our checkpoints: an `lm_eval` model class registered as `titans`.

Every request is fed through the streaming state in pieces of at most `piece_len` tokens, so a context of any
length costs linear time and bounded memory (no truncation to a context window: the memory carries it). The
harness's tasks then run as on any Hugging Face model:

    titans-train eval CKPT --task lm-eval --tasks lambada_openai,hellaswag
    lm_eval --model titans --model_args ckpt=CKPT --tasks ...   (after `import titans_train.eval.lm_eval_adapter`)

lm-eval is an optional dependency (`pip install -e '.[eval]'`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the module still imports; using it says what to install
    LM, register_model = object, None


def _register(name):
    return register_model(name) if register_model is not None else (lambda cls: cls)


@_register("titans")
class TitansEvalLM(LM):
    """lm-eval model over a TitansLM and its tokenizer; an empty context is conditioned on EOS."""

    def __init__(self, model, tok, piece_len: int = 1024, max_gen_toks: int = 256):
        if register_model is None:
            raise ImportError("lm-eval is not installed: pip install -e '.[eval]'")
        super().__init__()
        self.model, self.tok, self.piece_len, self.max_gen_toks = model.eval(), tok, piece_len, max_gen_toks

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """`ckpt=PATH[,piece_len=N]`: load a checkpoint or export directory."""
        from titans_train.eval.load import load_model, require_tokenizer

        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        _, model, tok = load_model(args["ckpt"])
        require_tokenizer(tok, args["ckpt"])
        return cls(model, tok, int(args.get("piece_len", 1024)))

    # --- streaming helpers ------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return [int(i) for i in self.tok.encode(text)]

    def _feed(self, ids: list[int], state):
        """Run ids through the model in pieces; returns (logits of the last position (vocab,), state)."""
        last = None
        dev = next(self.model.parameters()).device
        for start in range(0, len(ids), self.piece_len):
            x = torch.tensor(ids[start: start + self.piece_len], device=dev)[None]  # (1, t)
            logits, state = self.model(x, state)
            last = logits[0, -1]
        return last, state

    def _score(self, context: list[int], cont: list[int]) -> tuple[float, bool]:
        """log p(cont | context) and whether greedy decoding would produce cont; context must be non-empty."""
        _, state = self._feed(context[:-1], None) if len(context) > 1 else (None, None)
        ids, dev = context[-1:] + cont, next(self.model.parameters()).device
        logp, greedy = 0.0, True
        for start in range(0, len(cont), self.piece_len):  # inputs ids[start:stop], targets ids[start+1:stop+1]
            stop = min(start + self.piece_len, len(cont))
            logits, state = self.model(torch.tensor(ids[start:stop], device=dev)[None], state)
            lp = F.log_softmax(logits[0].double(), dim=-1)  # (t, vocab)
            target = torch.tensor(ids[start + 1: stop + 1], device=dev)
            logp += float(lp.gather(1, target[:, None]).sum())
            greedy &= bool((lp.argmax(-1) == target).all())
        return logp, greedy

    # --- the harness's three request types -------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx = self._ids(context) if context else [self.tok.eos_id]
            out.append(self._score(ctx, self._ids(continuation)))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests) -> list[float]:
        return [self._score([self.tok.eos_id], self._ids(req.args[0]))[0] for req in requests]

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n_max = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            last, state = self._feed(self._ids(context) or [self.tok.eos_id], None)
            new, text = [], ""
            dev = next(self.model.parameters()).device
            for _ in range(n_max):
                nxt = int(last.argmax())
                if nxt == self.tok.eos_id:
                    break
                new.append(nxt)
                text = self.tok.decode(new)
                if any(u in text for u in until):
                    break
                logits, state = self.model(torch.tensor([[nxt]], device=dev), state)
                last = logits[0, -1]
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


def run_lm_eval(model, tok, tasks: list[str], *, include_path: str | None = None, limit: float | None = None,
                num_fewshot: int | None = None, piece_len: int = 1024) -> dict:
    """Run lm-eval `tasks` through the harness's own evaluator (`simple_evaluate`); returns its per-task metrics.
    Tasks found under `include_path` alone are run without indexing the harness's thousands of built-in ones."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("--task lm-eval needs lm-eval: pip install -e '.[eval]'") from None
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown lm-eval task {unknown[0]!r} (see `lm_eval ls tasks`, or --include-path DIR)")
    if limit is not None and limit >= 1:
        limit = int(limit)
    res = lm_eval.simple_evaluate(model=TitansEvalLM(model, tok, piece_len), tasks=tasks, task_manager=manager,
                                  limit=limit, num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    results = {name: {k: v for k, v in m.items() if k != "alias"} for name, m in res["results"].items()}
    return {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "results": results}
