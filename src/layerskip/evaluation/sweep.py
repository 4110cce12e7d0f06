"""The (E, d) sweep: self-speculative speed for every exit layer E and speculation count d.

Each (E, d) row is its own small benchmark: autoregressive and self-speculative interleaved over the
task's prompts (bench.py), so each row's speedup is measured side by side, and rows measured in
different sessions stay comparable. Output in `out_dir`:
  sweep.csv    one row per (E, d): tokens/s, autoregressive tokens/s, speedup, acceptance, tokens per
               round, match rate, the cost model's predicted speedup;
  sweep.png    a heatmap of the measured speedup (E on y, d on x), the best cell outlined;
  sweep.json   the settings the rows were measured with, and the best (E, d).
Resumable: sweep.csv is rewritten atomically after every row; a rerun with the same settings skips
the (E, d) pairs already in it. Different settings in the same directory are refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from layerskip.errors import LayerSkipError
from layerskip import files as io
from layerskip.evaluation import plots
from layerskip.evaluation.bench import run_bench
from layerskip.evaluation.tasks import Task

FIELDS = ["exit_layer", "num_speculations", "tokens_per_second", "ar_tokens_per_second", "speedup",
          "acceptance_rate", "tokens_per_round", "match_rate", "predicted_speedup"]


@dataclass
class SweepResult:
    rows: list[dict]  # every row in sweep.csv, sorted by (E, d); numbers as floats/ints
    best: dict | None
    csv_path: Path
    png_path: Path
    json_path: Path
    measured: int  # rows measured in this call (the rest were resumed)


def parse_int_list(text: str, flag: str) -> list[int]:
    """"1,2,4" or "A:B:S" (A to B inclusive, step S; "A:B" steps by 1) -> sorted unique ints."""
    text = str(text).strip()
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            start, stop, step = parts[0], parts[1], parts[2] if len(parts) == 3 else 1
            if step < 1 or stop < start:
                raise ValueError
            values = list(range(start, stop + 1, step))
        else:
            values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise LayerSkipError(f"{flag} {text!r}: expected a list like 2,4,6 or a range A:B:S (B included)") from None
    if not values:
        raise LayerSkipError(f"{flag} is empty")
    return sorted(set(values))


def check_grid(exit_layers: list[int], num_speculations: list[int], num_layers: int) -> None:
    """One-line errors for E values outside [1, L) and d values below 1."""
    bad = [e for e in exit_layers if not 1 <= e < num_layers]
    if bad:
        raise LayerSkipError(f"--exit-layers {bad}: each must be in [1, {num_layers - 1}] for this "
                             f"{num_layers}-layer model")
    if any(d < 1 for d in num_speculations):
        raise LayerSkipError("--num-speculations: each value must be >= 1")


def run_sweep(model, tokenizer, task: Task, exit_layers: list[int], num_speculations: list[int],
              out_dir: str | Path, *, max_new_tokens: int = 64, model_name: str = "", predict: bool = True,
              progress: bool = True, on_row: Callable[[dict], None] | None = None,
              confidence_threshold: float | None = None, draft_vocab: int | None = None, engine=None) -> SweepResult:
    """Measure every (E, d) pair not yet in `out_dir`/sweep.csv, then write the heatmap.

    Args:
        exit_layers: E values, each in [1, L).
        num_speculations: d values, each >= 1.
        out_dir: where sweep.csv / sweep.png / sweep.json go (created if needed).
        on_row: called with each new row after it is saved (e.g. to report progress).
        confidence_threshold, draft_vocab: drafting options for every row (see `layerskip.generate`).
        engine: the model's engine (`layerskip.prepare`), reused by every row.
    Returns:
        SweepResult.
    """
    L = model.config.num_hidden_layers
    check_grid(exit_layers, num_speculations, L)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LayerSkipError(f"--out {out}: not a directory")
    csv_path, png_path, json_path = out / "sweep.csv", out / "sweep.png", out / "sweep.json"
    settings = {"model": model_name, "task": task.name, "num_samples": len(task.samples),
                "max_new_tokens": max_new_tokens, "num_layers": L}
    if confidence_threshold is not None:
        settings["confidence_threshold"] = confidence_threshold
    if draft_vocab is not None:
        settings["draft_vocab"] = draft_vocab
    rows = _resume(csv_path, json_path, settings)
    done = {(r["exit_layer"], r["num_speculations"]) for r in rows}
    todo = [(e, d) for e in exit_layers for d in num_speculations if (e, d) not in done]
    io.write_json(json_path, {"settings": settings, "best": _best(rows)})

    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="sweep", disable=not progress, leave=False, dynamic_ncols=True)
    for i, (e, d) in enumerate(todo):
        bar.set_postfix_str(f"E={e} d={d}", refresh=True)
        report = run_bench(model, tokenizer, task, strategies=["self_speculative"], exit_layer=e,
                           num_speculations=d, confidence_threshold=confidence_threshold, draft_vocab=draft_vocab,
                           max_new_tokens=max_new_tokens, warmup=i == 0, score=False,
                           predict=predict, model_name=model_name, progress=False, engine=engine)
        ar, ss = report.result("autoregressive"), report.result("self_speculative")
        row = {"exit_layer": e, "num_speculations": d, "tokens_per_second": ss.tokens_per_second,
               "ar_tokens_per_second": ar.tokens_per_second, "speedup": ss.speedup,
               "acceptance_rate": ss.acceptance_rate, "tokens_per_round": ss.tokens_per_round,
               "match_rate": ss.match_rate, "predicted_speedup": ss.predicted_speedup}
        rows = sorted(rows + [row], key=lambda r: (r["exit_layer"], r["num_speculations"]))
        io.write_csv(csv_path, rows, FIELDS)  # after every row: an interrupted sweep loses one row at most
        bar.update(1)
        if on_row:
            on_row(row)
    bar.close()
    best = _best(rows)
    io.write_json(json_path, {"settings": settings, "best": best})
    title = f"{model_name or 'model'} · {task.name} · {len(task.samples)} prompts · {max_new_tokens} tokens"
    drafting = []
    if confidence_threshold is not None:
        drafting.append(f"confidence threshold {confidence_threshold:g}")
    if draft_vocab is not None:
        drafting.append(f"draft vocabulary {draft_vocab or 'full'}")
    if drafting:
        title += "\n" + " · ".join(drafting)
    plots.plot_sweep_heatmap(rows, png_path, title=title)
    return SweepResult(rows, best, csv_path, png_path, json_path, measured=len(todo))


def _resume(csv_path: Path, json_path: Path, settings: dict) -> list[dict]:
    """Rows already measured with the same settings; refuses a directory holding another sweep."""
    if not csv_path.exists():
        return []
    if json_path.exists():
        try:
            saved = json.loads(json_path.read_text()).get("settings", {})
        except (json.JSONDecodeError, OSError, AttributeError):
            saved = None
        if saved != settings:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items()
                             if isinstance(saved, dict) and saved.get(k) != v) or "unreadable sweep.json"
            raise LayerSkipError(f"{csv_path.parent} holds a sweep with other settings ({diff}); "
                                 f"use another --out or delete that directory")
    try:
        raw = io.read_csv(csv_path)
        return [_typed(r) for r in raw]
    except (KeyError, ValueError, OSError) as e:
        raise LayerSkipError(f"{csv_path}: cannot resume from it ({e}); delete it to start over") from None


def _typed(row: dict) -> dict:
    out = {"exit_layer": int(row["exit_layer"]), "num_speculations": int(row["num_speculations"])}
    for key in FIELDS[2:]:
        value = row.get(key, "")
        out[key] = float(value) if value not in ("", None) else None
    return out


def _best(rows: list[dict]) -> dict | None:
    scored = [r for r in rows if r.get("speedup") is not None]
    return max(scored, key=lambda r: r["speedup"]) if scored else None
