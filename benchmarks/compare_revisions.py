"""Before vs after: the same benchmark commands run from two source trees, alternating, on one machine at one time.

A refactor must keep speed where it was, and two benchmark runs minutes apart on a shared machine can differ by
more than the change. So each command runs from the old tree (PYTHONPATH=OLD/src, e.g. a `git worktree` of the
previous commit) and from this one in turn, `--rounds` times (old, new, old, new, ...), and the JSON each run
writes is collected into one file with the ratio new / old of every figure that both report.

    git worktree add /tmp/old <commit>
    python benchmarks/compare_revisions.py --old /tmp/old --rounds 2 --out docs/results/refactor_speed.json

The commands (edit `COMMANDS` for others): the synthetic benchmark (16x768 Llama, exact draft at E=4) and the
built-in model on 12 HumanEval prompts, ours only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
COMMANDS = {
    "synthetic": [sys.executable, "{root}/benchmarks/synthetic_speed.py", "--threads", "2", "--repeats", "5",
                  "--skip-transformers", "--json", "{json}"],
    "humaneval_builtin": [sys.executable, "-m", "layerskip", "bench", "--task", "humaneval", "--limit", "12",
                          "--max-new-tokens", "128", "--strategies", "autoregressive,self-speculative",
                          "--threads", "1", "--no-metrics", "--json", "{json}"],
}


def figures(name: str, report: dict) -> dict[str, float]:
    """The speed figures of one run: tokens/s of each of ours, and self-speculative / autoregressive."""
    if name == "synthetic":
        tps = report["tokens_per_second"]
        return {"autoregressive_tokens_per_s": tps["ours_autoregressive"],
                "self_speculative_tokens_per_s": tps["ours_self_speculative"],
                "speedup": report["measured_speedup_vs_ours_autoregressive"]}
    rows = {r["strategy"]: r for r in report["results"]}
    return {"autoregressive_tokens_per_s": rows["autoregressive"]["tokens_per_second"],
            "self_speculative_tokens_per_s": rows["self_speculative"]["tokens_per_second"],
            "speedup": rows["self_speculative"]["speedup"],
            "self_speculative_match_rate": rows["self_speculative"]["match_rate"]}


def run(name: str, root: Path, src: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [part.format(root=root, json=out) for part in COMMANDS[name]]
        env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report = json.loads(out.read_text())
    return {"seconds": time.time() - t0, "figures": figures(name, report), "report": report}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="the old source tree (its src/ goes on PYTHONPATH)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", choices=sorted(COMMANDS), action="append")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    trees = {"old": Path(args.old).resolve(), "new": HERE}
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
              "old": str(trees["old"]), "commands": {}, "runs": {}}
    for name in args.only or COMMANDS:
        result["commands"][name] = " ".join(COMMANDS[name])
        runs = result["runs"][name] = {"old": [], "new": []}
        for r in range(args.rounds):
            for side in ("old", "new") if r % 2 == 0 else ("new", "old"):  # alternate which goes first
                got = run(name, trees[side], trees[side] / "src")
                runs[side].append(got)
                print(f"{name} round {r + 1} {side}: {got['figures']}", flush=True)
        keys = runs["old"][0]["figures"].keys()
        result.setdefault("summary", {})[name] = {
            k: {"old_median": statistics.median(x["figures"][k] for x in runs["old"]),
                "new_median": statistics.median(x["figures"][k] for x in runs["new"]),
                "old_runs": [x["figures"][k] for x in runs["old"]],
                "new_runs": [x["figures"][k] for x in runs["new"]]} for k in keys}
        for k, v in result["summary"][name].items():
            v["new_over_old"] = v["new_median"] / v["old_median"] if v["old_median"] else None
    text = json.dumps(result, indent=2)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
