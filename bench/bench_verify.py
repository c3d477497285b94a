"""Verifying: `modelsign verify` beside `model_signing verify key`, same model and bundle, one run.

Usage: .venv/bin/python bench/bench_verify.py [--large 4] [--large-mib 512] [--small 200] [--runs 3]

Builds a model in a temp dir (default 4 x 512 MiB + 200 small files, ~2 GiB), signs it once
with model_signing and a throwaway P-256 key (so the reference verifier reads its own bundle
format), warms the page cache, then runs both verifiers `--runs` times interleaved and prints
median wall time, peak RSS and the ratio. Both re-hash every file. Deletes everything after.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hashing import build_model, run

BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", type=int, default=4)
    parser.add_argument("--large-mib", type=int, default=512)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    try:
        model = work / "model"
        model.mkdir()
        files = build_model(model, args.large, args.large_mib, args.small)
        size = sum(p.stat().st_size for p in files)
        key = ec.generate_private_key(ec.SECP256R1())
        (work / "key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (work / "pub.pem").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        sig = work / "model.sig"
        run([str(BIN / "model_signing"), "sign", "key", "--private_key", str(work / "key.pem"),
             "--signature", str(sig), str(model)])  # fmt: skip
        contenders = {
            "modelsign verify --public-key": [
                str(BIN / "modelsign"), "verify", str(model), "--signature", str(sig),
                "--public-key", str(work / "pub.pem"), "--quiet",
            ],
            "model_signing verify key": [
                str(BIN / "model_signing"), "verify", "key", "--signature", str(sig),
                "--public_key", str(work / "pub.pem"), str(model),
            ],
        }  # fmt: skip
        for cmd in contenders.values():  # warm the page cache and the imports
            run(cmd)
        walls: dict[str, list[float]] = {name: [] for name in contenders}
        rss: dict[str, float] = dict.fromkeys(contenders, 0.0)
        for _ in range(args.runs):
            for name, cmd in contenders.items():
                wall, peak, _ = run(cmd)
                walls[name].append(wall)
                rss[name] = max(rss[name], peak)
        print(f"model: {len(files)} files, {size / 2**20:.0f} MiB; runs: {args.runs}")
        print("| contender | median | throughput | peak RSS |\n|---|---|---|---|")
        medians = {name: statistics.median(w) for name, w in walls.items()}
        for name, median in medians.items():
            print(
                f"| `{name}` | {median:.3f} s | {size / median / 1e6:.0f} MB/s "
                f"| {rss[name]:.0f} MB |"
            )
        ratio = medians["model_signing verify key"] / medians["modelsign verify --public-key"]
        print(f"modelsign verify is {ratio:.2f}x the speed of model_signing verify key")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
