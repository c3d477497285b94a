"""Hashing: `modelsign hash` beside `openssl dgst -sha256` and model_signing, same files, one run.

Usage: .venv/bin/python bench/bench_hashing.py [--large 4] [--large-mib 512] [--small 200] [--runs 3]

Builds its own model in a temp dir (N large random files + M small ones), warms the page
cache, then runs each contender `--runs` times interleaved and prints median wall time,
throughput, peak RSS (from the kernel, via /usr/bin/time or wait4) and the ratios the
performance issue targets. Deletes the model afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MS_INPROC = (
    "import sys, time; from model_signing import hashing; t = time.perf_counter(); "
    "hashing.Config().hash(sys.argv[1]); print(time.perf_counter() - t)"
)
#: The same for modelsign: its hashing function, timed inside the process, as the CLI calls it.
OURS_INPROC = (
    "import sys, time; from signing_service.client import hashing; t = time.perf_counter(); "
    "hashing.hash_model(sys.argv[1]); print(time.perf_counter() - t)"
)


def build_model(root: Path, large: int, large_mib: int, small: int) -> list[Path]:
    chunk = os.urandom(1 << 20)
    for i in range(large):
        with open(root / f"model-{i:05d}-of-{large:05d}.safetensors", "wb") as fh:
            for j in range(large_mib):
                fh.write(chunk[j % 7 :] + chunk[: j % 7])  # distinct blocks, cheap to make
    (root / "tokenizer").mkdir()
    for i in range(small):
        (root / "tokenizer" / f"part-{i:03d}.json").write_bytes(os.urandom(4096 + i))
    return sorted(p for p in root.rglob("*") if p.is_file())


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MB of the child, and its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read() if proc.stdout else ""
    if status != 0:
        raise SystemExit(f"{cmd[0]} failed with status {status}")
    return wall, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", type=int, default=4)
    parser.add_argument("--large-mib", type=int, default=512)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-hash-"))
    model = tmp / "model"
    model.mkdir()
    try:
        files = build_model(model, args.large, args.large_mib, args.small)
        total = sum(f.stat().st_size for f in files)
        contenders = {
            "openssl dgst -sha256": ["openssl", "dgst", "-sha256", *map(str, files)],
            "modelsign hash (whole process)": [PY, "-m", "signing_service.client", "hash", str(model), "--no-progress"],
            "model_signing hashing (whole process)": [PY, "-c", MS_INPROC, str(model)],
        }  # fmt: skip
        ours_inside = [PY, "-c", OURS_INPROC, str(model)]  # only the time it prints counts
        for cmd in [*contenders.values(), ours_inside]:
            run(cmd)  # warm the page cache and bytecode
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
        inside: dict[str, list[float]] = {"model_signing": [], "modelsign": []}
        for _ in range(args.runs):
            for name, cmd in contenders.items():
                wall, rss, out = run(cmd)
                results[name].append((wall, rss))
                if name.startswith("model_signing"):
                    inside["model_signing"].append(float(out.strip()))
            inside["modelsign"].append(float(run(ours_inside)[2].strip()))
        report(results, inside, total, len(files), args.runs)
    finally:
        shutil.rmtree(tmp)


def report(
    results: dict[str, list[tuple[float, float]]],
    inside: dict[str, list[float]],
    total: int,
    n: int,
    runs: int,
) -> None:
    print(
        f"model: {n} files, {total / 2**20:.0f} MiB; {os.cpu_count()} CPUs; {runs} interleaved runs, warm cache"
    )
    med = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    med["model_signing hashing (in-process, no import)"] = statistics.median(
        inside["model_signing"]
    )
    med["modelsign hashing (in-process, no import)"] = statistics.median(inside["modelsign"])
    for name, seconds in med.items():
        rss = max((r for _, r in results.get(name, [])), default=float("nan"))
        print(
            f"  {name:46s} {seconds:7.3f} s  {total / seconds / 1e6:6.0f} MB/s  peak RSS {rss:5.0f} MB"
        )
    ours = med["modelsign hash (whole process)"]
    theirs = med["model_signing hashing (in-process, no import)"]
    print(
        f"modelsign / openssl throughput:                     {med['openssl dgst -sha256'] / ours:.2f}x (target >= 0.95)"
    )
    print("modelsign / model_signing hashing (target >= 1.1):")
    print(
        f"  in process, both (the hashing alone):             {theirs / med['modelsign hashing (in-process, no import)']:.2f}x"
    )
    print(
        f"  whole processes, both (start-up and imports too): {med['model_signing hashing (whole process)'] / ours:.2f}x"
    )
    print(f"  modelsign whole process / model_signing in process (strictest): {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
