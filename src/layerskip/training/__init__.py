"""LayerSkip training: layer dropout, the early-exit loss and its curricula, on the transformers Trainer.

    from layerskip.training import build_config, train
    result = train(build_config(data=["src/"], output_dir="runs/x", preset="code_finetuning"))

Modules: layer_dropout (p(l, t), per-sample masks, skipped rows), early_exit_loss (e(l), w(t, l), the
shared-head loss), curriculum (rotational, gradual, none, last), model (the training forward), data
(files/JSONL/datasets -> packed blocks), config (TrainConfig, presets, YAML recipes), loading (model, config
and tokenizer), trainer (train()), step_log (training_log.jsonl), selfgen (`layerskip selfgen`), cli
(`layerskip train`). The speed/memory benchmark is benchmarks/training_bench.py.
Imports are lazy so that `layerskip --help` does not load transformers.
"""

__all__ = ["TrainConfig", "build_config", "train"]


def __getattr__(name):
    if name in ("TrainConfig", "build_config"):
        from layerskip.training import config

        return getattr(config, name)
    if name == "train":
        from layerskip.training.trainer import train

        return train
    raise AttributeError(name)
