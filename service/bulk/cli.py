"""`alit-serve tokenize-dataset SRC OUT`: the options, and exit statuses 0 (every image tokenized),
1 (some image or source failed, or the run stopped) and 2 (nothing could start)."""

from __future__ import annotations

import argparse
import logging
import re
import sys

RAY_ADDRESS = re.compile(r"auto|local|ray://\S+|\S+:\d+")  # what may follow a bare --ray as its address


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="a folder of images, a text file of image paths, WebDataset .tar "
                   "shards (a file, a folder or a glob) or Parquet files with an image column")
    p.add_argument("out", metavar="OUT", help="the output folder: part-NNNNN.parquet, _manifest.json, "
                   "_tokens_histogram.png")
    p.add_argument("--model", help="weights path or preset:NAME (default: the service's, $ALIT_MODEL)")
    t = p.add_argument_group("target (as POST /v1/tokenize; none: the service's default)")
    t.add_argument("--max-l1", type=float)
    t.add_argument("--min-psnr", type=float)
    t.add_argument("--tokens", type=int)
    t.add_argument("--max-tokens", type=int)
    p.add_argument("--devices", help="auto, cpu, or cuda:0,cuda:1 (default: $ALIT_DEVICES, auto)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT: skip the images it has")
    p.add_argument("--overwrite", action="store_true", help="replace what an earlier run wrote in OUT")
    p.add_argument("--image-column", default="image", help="Parquet: the column of image bytes (default: image)")
    p.add_argument("--key-column", help="Parquet: the column naming each image (default: FILE:ROW)")
    p.add_argument("--shard-rows", type=int, default=1000, help="rows per output shard (default: 1000)")
    p.add_argument("--window", type=int, help="images in flight, read ahead of the engine (default: 4 x max batch x "
                   "devices)")
    p.add_argument("--decode-threads", type=int, help="threads decoding images (default: up to 4)")
    p.add_argument("--ray", nargs="?", const=True, default=False, metavar="ADDRESS",
                   help="run on a Ray cluster (ADDRESS: auto, HOST:PORT or ray://...; alone: $RAY_ADDRESS or a local "
                        "Ray)")
    p.add_argument("--ray-actors", type=int, help="Ray: engines (actors), one device each (default: one per GPU, "
                   "else as the cluster's CPUs allow)")
    p.add_argument("--ray-cpus-per-actor", type=float, default=1.0, help="Ray, CPU actors: cores each (default: 1)")
    p.add_argument("--ray-batch-size", type=int, default=16, help="Ray: images per batch handed to an actor")
    p.add_argument("--cache", metavar="URL", help="also put every result into the service's Redis trajectory cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")


def bare_ray(argv: list[str]) -> list[str]:
    """`--ray SRC OUT`: a bare --ray whose next word is not a Ray address takes no value (argparse
    would take SRC for one)."""
    out = list(argv)
    for i, word in enumerate(out[:-1]):
        if word == "--ray" and not RAY_ADDRESS.fullmatch(out[i + 1]):
            out[i] = "--ray="
    return out


def main(args: argparse.Namespace) -> int:
    from . import BulkError, RunFailed, tokenize_dataset

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = tokenize_dataset(
            args.src, args.out, model=args.model, max_l1=args.max_l1, min_psnr=args.min_psnr, tokens=args.tokens,
            max_tokens=args.max_tokens, devices=args.devices, resume=args.resume, overwrite=args.overwrite,
            image_column=args.image_column, key_column=args.key_column, shard_rows=args.shard_rows,
            window=args.window, decode_threads=args.decode_threads,
            ray=True if args.ray == "" else args.ray, ray_actors=args.ray_actors,
            ray_cpus_per_actor=args.ray_cpus_per_actor, ray_batch_size=args.ray_batch_size, cache=args.cache,
            quiet=args.quiet)
    except BulkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: complete shards are in {args.out}; --resume continues", file=sys.stderr)
        return 130
    print(summary.line())
    return summary.exit_code
