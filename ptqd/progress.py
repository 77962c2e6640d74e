"""Progress bars for long work (tqdm on stderr; ``enabled=None``: only when stderr is a terminal)."""

from __future__ import annotations


def progress_bar(total: int, desc: str, enabled: bool | None = None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=(None if enabled is None else not enabled),
                bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {postfix}")
