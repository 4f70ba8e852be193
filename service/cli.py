"""`alit-serve`: serve the HTTP API, verify against a reference fixture, convert checkpoints, tokenize datasets."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from .api.server import serve
    from .settings import Settings

    overrides = {k: v for k, v in {"model": args.model, "host": args.host, "port": args.port}.items() if v is not None}
    serve(Settings(**overrides))
    return 0


def _call_server(args: argparse.Namespace, call):
    """`call(client)` against `args.url`; None, after one line on stderr, when the server answers an
    error or cannot be reached (or a file cannot be read)."""
    import httpx

    from .client import AlitError, Client

    try:
        with Client(args.url, api_key=args.api_key) as c:
            return call(c)
    except AlitError as e:
        print(f"error: {e}", file=sys.stderr)
    except httpx.TransportError as e:
        print(f"error: cannot reach {args.url}: {e}", file=sys.stderr)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
    return None


def _tokenize(args: argparse.Namespace) -> int:
    if not Path(args.image).is_file():
        print(f"error: no such image file: {args.image}", file=sys.stderr)
        return 2
    r = _call_server(args, lambda c: c.tokenize(args.image, max_l1=args.max_l1, min_psnr=args.min_psnr,
                                                 tokens=args.tokens, max_tokens=args.max_tokens, model=args.model))
    if r is None:
        return 1
    keys = ("num_tokens", "iterations", "l1", "psnr", "target_met", "cached", "token_ids", "positions")
    print(json.dumps({k: r[k] for k in keys if k in r}))
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    if args.ids == "-":
        text = sys.stdin.read()
    else:
        text = Path(args.ids).read_text() if Path(args.ids).is_file() else args.ids
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [int(x) if x.lstrip("-").isdigit() else x for x in text.replace(",", " ").split()]
    ids = data.get("token_ids") if isinstance(data, dict) else data
    positions = data.get("positions") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(isinstance(x, int) for x in ids):
        print("error: token ids must be a JSON list of integers, a JSON object with token_ids (as `tokenize` "
              "prints), or integers separated by spaces or commas", file=sys.stderr)
        return 2
    png = _call_server(args, lambda c: c.reconstruct(ids, positions=positions, model=args.model))
    if png is None:
        return 1
    Path(args.out).write_bytes(png)
    print(f"wrote {args.out} ({len(png)} bytes)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    import torch

    from .verify import verify

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        report = verify(args.fixture, device=args.device, dtype=args.dtype, batch_mode=args.batch_mode,
                        compiled=args.compile)
    except (FileNotFoundError, KeyError, ValueError) as e:  # a CheckpointError, a batch mode that cannot run here
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"fixture {args.fixture} on {args.device} ({args.dtype}, {args.batch_mode} batching"
          f"{', compiled' if args.compile else ''})")
    print(report.table())
    return 0 if report.ok else 1


def _convert(args: argparse.Namespace) -> int:
    from .model.checkpoint import CheckpointError, convert

    try:
        loaded = convert(args.src, args.out_dir, heads=args.heads)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}/model.safetensors, config.json, MODEL_CARD.md (fingerprint {loaded.fingerprint})")
    return 0


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from .bench import add_arguments

    add_arguments(p)


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import main as bench_main
    from .bench.families import FamiliesError
    from .bench.workload import WorkloadError
    from .model.checkpoint import CheckpointError
    from .model.config import ConfigError

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} requested but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        return bench_main(args)
    except (CheckpointError, ConfigError, WorkloadError, FamiliesError) as e:  # a model, folder or option it cannot use
        print(f"error: {e}", file=sys.stderr)
        return 2


def _tokenize_dataset_arguments(p: argparse.ArgumentParser) -> None:
    from .bulk.cli import add_arguments

    add_arguments(p)


def _tokenize_dataset(args: argparse.Namespace) -> int:
    from .bulk.cli import main as bulk_main

    return bulk_main(args)  # exit 0 every image tokenized, 1 some failed, 2 nothing could start


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tokenize-dataset"]:
        from .bulk.cli import bare_ray

        argv = bare_ray(argv)
    from .model.config import BATCH_MODES

    p = argparse.ArgumentParser(prog="alit-serve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP service (uvicorn)")
    s.add_argument("--model", help="weights path or preset:NAME (default: $ALIT_MODEL or the built-in default)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=_serve)

    v = sub.add_parser("verify", help="compare outputs with a reference fixture; exit 1 on mismatch")
    v.add_argument("fixture", help="fixture directory (config.json, checkpoint.pth, expected.npz)")
    v.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    v.add_argument("--batch-mode", default="packed", choices=BATCH_MODES)
    v.add_argument("--compile", action="store_true", help="torch.compile the model first (as ALIT_COMPILE)")
    v.set_defaults(func=_verify)

    t = sub.add_parser("tokenize", help="tokenize an image with a running server")
    t.add_argument("image")
    t.add_argument("--url", default=os.environ.get("ALIT_URL", "http://127.0.0.1:8000"))
    t.add_argument("--api-key", default=os.environ.get("ALIT_API_KEY"))
    t.add_argument("--max-l1", type=float)
    t.add_argument("--min-psnr", type=float)
    t.add_argument("--tokens", type=int)
    t.add_argument("--max-tokens", type=int)
    t.add_argument("--model", help="a served model's id (default: the server's default model)")
    t.set_defaults(func=_tokenize)

    r = sub.add_parser("reconstruct", help="token ids (JSON list, file, or - for stdin) -> PNG via a running server")
    r.add_argument("ids")
    r.add_argument("-o", "--out", default="reconstruction.png")
    r.add_argument("--url", default=os.environ.get("ALIT_URL", "http://127.0.0.1:8000"))
    r.add_argument("--api-key", default=os.environ.get("ALIT_API_KEY"))
    r.add_argument("--model", help="the served model whose tokens these are (default: the server's default)")
    r.set_defaults(func=_reconstruct)

    sub.add_parser("triton", help="run a local tritonserver (nvidia-pytriton wheel) on model_repository/")
    sub.add_parser("loadtest", help="Locust load steps against a local service or --url; writes a report")
    sub.add_parser("train", help="train the default model (stage 1 VQGAN, stage 2 latent distillation, ...)")
    sub.add_parser("gpu-job", help="the whole training job (data, VQGAN, distillation, export, evaluation) in "
                   "--budget-minutes, on a GPU when torch sees one")
    sub.add_parser("evaluate", help="per-iteration L1/PSNR on a folder of images, and a picture")
    sub.add_parser("corpus", help="the training corpus from installed Debian packages' photographs and textures")

    b = sub.add_parser("bench",
                       help="the engine benchmark (continuous vs lock-step vs reference) on a folder of images")
    _bench_arguments(b)
    b.set_defaults(func=_bench)

    d = sub.add_parser("tokenize-dataset", help="tokenize a dataset (image folder, list, WebDataset, Parquet) into "
                       "Parquet shards, here or on a Ray cluster; exit 1 if some image failed")
    _tokenize_dataset_arguments(d)
    d.set_defaults(func=_tokenize_dataset)

    c = sub.add_parser("convert", help="published .pth -> model.safetensors + config.json + MODEL_CARD.md")
    c.add_argument("src")
    c.add_argument("out_dir")
    c.add_argument("--heads", type=int, help="attention heads when no preset matches the weights")
    c.set_defaults(func=_convert)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["triton"]:  # its own options, parsed by service.triton_launcher
        from .triton_launcher import main as triton_main

        return triton_main(argv[1:])
    from .training import COMMANDS as TRAINING_COMMANDS

    if argv[:1] and argv[0] in TRAINING_COMMANDS:  # the training package parses its own options
        from .training import main as training_main

        return training_main(argv)
    if argv[:1] == ["loadtest"]:  # loadtest/run_load.py, from a source checkout
        script = Path(__file__).resolve().parents[1] / "loadtest" / "run_load.py"
        if not script.is_file():
            print("error: `alit-serve loadtest` runs from a source checkout (loadtest/run_load.py)", file=sys.stderr)
            return 2
        import runpy

        sys.argv = [str(script), *argv[1:]]
        runpy.run_path(str(script), run_name="__main__")
        return 0
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
