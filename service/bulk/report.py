"""Where rows go: the shard writer, the progress bar, the running counts; then the manifest's
numbers and the histogram of tokens per image."""

from __future__ import annotations

import collections
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .shards import HISTOGRAM, ShardWriter
from .sources import Record

POSTFIX_EVERY_S = 0.5


class Sink:
    """Rows (in any order) to shards, with a progress bar (images done, img/s, ETA, mean tokens so
    far); unreadable sources remembered for the summary. `prior`: the rows a resumed run found."""

    def __init__(self, writer: ShardWriter, total: int | None, quiet: bool, prior: list[dict[str, Any]]):
        self.writer = writer
        self.stats: list[dict[str, Any]] = list(prior)  # {num_tokens, error_code} of every row in OUT
        self.prior = len(prior)
        self.unreadable_sources: list[dict[str, str]] = []
        self._tokens = sum(s["num_tokens"] or 0 for s in prior if s["error_code"] is None)
        self._ok = sum(1 for s in prior if s["error_code"] is None)
        self._postfix_at = 0.0
        self.started = time.monotonic()  # throughput counts from here (`start`: once the engine is warm)
        # disable=None: tqdm draws only on a terminal
        self.bar = tqdm(total=total, unit="img", desc="tokenize", disable=True if quiet else None,
                        dynamic_ncols=True, smoothing=0.05)

    def start(self) -> None:
        self.started = time.monotonic()
        self.bar.reset(total=self.bar.total)  # its rate and ETA count from here too

    @property
    def done(self) -> int:
        """Rows written or buffered by this run."""
        return len(self.stats) - self.prior

    def row(self, row: dict[str, Any]) -> None:
        self.writer.add(row)
        self.stats.append({"num_tokens": row["num_tokens"], "error_code": row["error_code"]})
        if row["error_code"] is None:
            self._ok += 1
            self._tokens += row["num_tokens"]
        now = time.monotonic()
        if now - self._postfix_at >= POSTFIX_EVERY_S and self._ok:
            self._postfix_at = now
            self.bar.set_postfix_str(f"mean tokens {self._tokens / self._ok:.1f}", refresh=False)
        self.bar.update(1)

    def unreadable(self, rec: Record) -> None:
        self.unreadable_sources.append({"path": rec.source or "", "error": rec.error or ""})
        self.bar.write(f"warning: {rec.error}")

    def close(self) -> None:
        self.writer.flush()
        self.bar.close()

    def counts(self) -> dict[str, Any]:
        errors = collections.Counter(s["error_code"] for s in self.stats if s["error_code"] is not None)
        return {"rows": len(self.stats), "ok": len(self.stats) - sum(errors.values()), "failed": sum(errors.values()),
                "this_run": self.done, "from_earlier_runs": self.prior,
                "unreadable_sources": len(self.unreadable_sources), "errors_by_code": dict(sorted(errors.items()))}

    def tokens(self) -> list[int]:
        return [s["num_tokens"] for s in self.stats if s["error_code"] is None]


def token_summary(tokens: list[int]) -> dict[str, Any]:
    if not tokens:
        return {"images": 0}
    return {"images": len(tokens), "mean": round(statistics.fmean(tokens), 3), "median": statistics.median(tokens),
            "min": min(tokens), "max": max(tokens), "total": sum(tokens),
            "counts": {str(k): v for k, v in sorted(collections.Counter(tokens).items())}}


def write_histogram(out: Path, tokens: list[int], title: str, max_tokens: int) -> str | None:
    """_tokens_histogram.png: images per token count. Returns why not when it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'alit-serve[bench]')"
    from .shards import write_atomic

    counts = collections.Counter(tokens)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    width = max(1.0, max_tokens / 64)
    if counts:
        ax.bar(list(counts), list(counts.values()), width=width, color="#4c72b0")
        mean = statistics.fmean(tokens)
        ax.axvline(mean, color="#c44e52", linestyle="--", linewidth=1, label=f"mean {mean:.1f}")
        ax.legend(frameon=False, loc="upper left")
    ax.set_xlim(0, max_tokens + width)
    ax.set_xlabel("tokens per image")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    write_atomic(out / HISTOGRAM, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return None
