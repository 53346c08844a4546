"""``python -m bench.compile_start``: how long a compiled worker takes to be ready, cold and warm.

Starts two fresh Python processes one after the other, sharing one compile cache folder
(``DARKROOM_COMPILE_CACHE_DIR``, empty before the first): the first compiles everything (cold), the second
finds the compiled kernels on disk (warm; dynamo still traces, inductor does not compile again). Each
reports the seconds from process start to: pipeline prepared, warm-up done (every graph compiled), and the
first image after the warm-up. ``--size tiny`` runs the offline tiny model on CPU (the default on a machine
without CUDA); ``--size full`` SD3.5-Medium's architecture with random bf16 weights on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()


def parse_sizes(text: str | None) -> list[tuple[int, int]] | None:
    if not text:
        return None
    return [(int(w), int(h)) for w, h in (item.split("x") for item in text.split(","))]


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One worker start: load, prepare (compile), warm up, one request. Seconds since process start."""
    import torch

    from schemas.sizes import ASPECT_RATIO_SIZES
    from services.settings import Settings
    from worker import optimizations
    from worker.pipeline_loader import LoadedModel, prepare_pipeline, resolve_device

    marks: dict[str, Any] = {"imported_s": round(time.perf_counter() - STARTED, 2)}
    settings = Settings(
        model="tiny" if args.size == "tiny" else "bench-random-sd3.5-medium",
        device=args.device,
        compile=True,
        compile_cache_dir=Path(args.cache_dir),
        compile_warmup=False,  # run below, with the sizes asked for
        warmup=False,
    )
    device = resolve_device(settings.device)
    if args.size == "full":
        from bench.sd35_arch import build_full_pipeline

        pipe = build_full_pipeline(device, torch.bfloat16)
    else:
        from worker.tiny_model import build_tiny_pipeline

        pipe = build_tiny_pipeline()
    marks["built_s"] = round(time.perf_counter() - STARTED, 2)
    pipe = prepare_pipeline(pipe, settings)
    marks["prepared_s"] = round(time.perf_counter() - STARTED, 2)
    sizes = parse_sizes(args.sizes) or list(ASPECT_RATIO_SIZES.values())
    warm = optimizations.warm_up_presets(pipe, sizes=sizes)
    marks["warm_up"] = warm
    marks["ready_s"] = round(time.perf_counter() - STARTED, 2)
    from schemas.generation import GenerationRequest
    from worker.engine import GenerationEngine

    model = LoadedModel(pipeline=pipe, model=settings.model, source="local", device=device, dtype=pipe.dtype)
    width, height = sizes[-1]
    graphs = optimizations.compiled_graphs()
    request = GenerationRequest(prompt="a red fox", width=width, height=height, num_inference_steps=2, seed=1)
    GenerationEngine(model).generate(request)
    marks["first_image_s"] = round(time.perf_counter() - STARTED, 2)
    marks["graphs_compiled_by_first_image"] = optimizations.compiled_graphs() - graphs
    return marks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_start", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", help="warm-up sizes as WxH,WxH (default: the nine aspect-ratio presets)")
    parser.add_argument("--cache-dir", help="compile cache folder (default: a fresh temporary one)")
    parser.add_argument("--out", help="results JSON (default bench/results/compile-start-<size>.json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size is None:
        import torch

        args.size = "full" if torch.cuda.is_available() else "tiny"
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="darkroom-compile-"))
    results: dict[str, Any] = {
        "size": args.size,
        "sizes": args.sizes or "presets",
        "cache_dir": str(cache_dir),
    }
    for run in ("cold", "warm"):
        command = [sys.executable, "-m", "bench.compile_start", "--child", "--size", args.size]
        command += ["--device", args.device, "--cache-dir", str(cache_dir)]
        if args.sizes:
            command += ["--sizes", args.sizes]
        print(f"[compile-start] {run} start", flush=True)
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"{run} start failed:\n{done.stderr[-4000:]}")
        results[run] = json.loads(lines[-1][len("RESULT ") :])
        print(f"[compile-start] {run}: {results[run]}", flush=True)
    from bench.common import write_results

    path = write_results(f"compile-start-{args.size}", results, Path(args.out) if args.out else None)
    cold, warm = results["cold"], results["warm"]
    print(
        f"\nready (process start -> warm-up done): cold {cold['ready_s']} s, warm {warm['ready_s']} s; "
        f"first image: cold {cold['first_image_s']} s, warm {warm['first_image_s']} s\nresults: {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
