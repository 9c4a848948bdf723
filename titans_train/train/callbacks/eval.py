"""Evaluation during fit (recipe section `eval`): loss by position on a small held-out set, streamed through the
state vs isolated windows, and optionally a small needle grid, every `eval.every_steps` optimiser steps.

Runs on rank 0 only, with whole weights (so not under fsdp / deepspeed_stage_3, which `fit` refuses), in eval
mode under no_grad, and logs to every logger (W&B, CSV) under `eval/...`:
`eval/loss_streamed`, `eval/loss_windowed`, `eval/loss_streamed/pos_<start>` per position bucket (same for
windowed), `eval/niah_acc` and `eval/niah_acc/<length>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L


@dataclass
class EvalDuringFit(L.Callback):
    cfg: object  # EvalConfig
    data_path: str
    tokenizer: str  # data.tokenizer of the recipe
    window: int
    _last: int = field(default=-1, repr=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats, step = pl_module.step_stats, trainer.global_step
        if stats is None or stats.skipped or step % self.cfg.every_steps or step == self._last:
            return
        self._last = step
        if trainer.is_global_zero:
            metrics = self.evaluate(pl_module.model)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        trainer.strategy.barrier("titans_eval")

    def evaluate(self, model) -> dict[str, float]:
        from titans_train.eval.ppl import documents, evaluate_ppl

        c, was_training = self.cfg, model.training
        model.eval()
        try:
            r = evaluate_ppl(model, documents(self.data_path, c.split, c.max_tokens), self.window, c.piece_len)
            m = {"eval/loss_streamed": r["loss_streamed"], "eval/loss_windowed": r["loss_windowed"]}
            for b in r["buckets"]:
                if b["tokens"]:
                    m[f"eval/loss_streamed/pos_{b['start']}"] = b["loss_streamed"]
                    m[f"eval/loss_windowed/pos_{b['start']}"] = b["loss_windowed"]
            if c.niah_lengths:
                m.update(self._niah(model))
        finally:
            model.train(was_training)
        return m

    def _niah(self, model) -> dict[str, float]:
        from titans_train.data.shards import Manifest
        from titans_train.eval.niah import CorpusHaystack, evaluate_niah, noise_haystack

        c = self.cfg
        tok = Manifest(self.data_path).load_tokenizer(self.tokenizer)
        hay = CorpusHaystack(self.data_path, c.split, tok.eos_id) if c.niah_haystack == "corpus" else noise_haystack(tok)
        r = evaluate_niah(model, tok, c.niah_lengths, c.niah_depths, c.niah_samples, c.niah_needle, hay, seed=c.seed,
                          digits=c.niah_digits, piece_len=c.piece_len)
        m = {"eval/niah_acc": r["mean_accuracy"]}
        for length, row in r["accuracy"].items():
            m[f"eval/niah_acc/{length}"] = sum(row.values()) / len(row)
        return m
