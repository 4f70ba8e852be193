"""`alit-serve`: serve the HTTP API, verify against a reference fixture, convert checkpoints."""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app
    from .config import Settings

    overrides = {k: v for k, v in {"model": args.model, "host": args.host, "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)
    return 0


def _verify(args: argparse.Namespace) -> int:
    import torch

    from .model.checkpoint import CheckpointError
    from .verify import verify

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        report = verify(args.fixture, device=args.device, dtype=args.dtype, batch_mode=args.batch_mode)
    except (CheckpointError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"fixture {args.fixture} on {args.device} ({args.dtype}, {args.batch_mode} batching)")
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


def main(argv: list[str] | None = None) -> int:
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
    v.add_argument("--batch-mode", default="cohort", choices=["cohort", "padded"])
    v.set_defaults(func=_verify)

    c = sub.add_parser("convert", help="published .pth -> model.safetensors + config.json + MODEL_CARD.md")
    c.add_argument("src")
    c.add_argument("out_dir")
    c.add_argument("--heads", type=int, help="attention heads when no preset matches the weights")
    c.set_defaults(func=_convert)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
