"""Data: tokenizers, `titans-train prepare` (raw text -> webdataset token shards + manifest), the streaming
pipeline (shards -> packed windows of n_chunks x chunk_len + 1 tokens with document-start masks, exact resume)
and the Lightning DataModule over it. Lightning is imported only by `datamodule`."""

from titans_train.data.config import DataConfig

__all__ = ["DataConfig", "TitansDataModule"]


def __getattr__(name):  # keep `import titans_train.data` light: Lightning loads on first use of the DataModule
    if name == "TitansDataModule":
        from titans_train.data.datamodule import TitansDataModule

        return TitansDataModule
    raise AttributeError(name)
