"""Per-token credit of sampled rollouts as a heatmap: a self-contained HTML page and a PNG.

    python tools/credit_heatmap.py --run RUN_DIR [--step N] --out DIR [--per-outcome 2] [--sample-id ID ...]

Reads RUN_DIR/credit/step_NNNNNNN.jsonl (the newest dump without --step), which the trainer
writes every `trainer.dump_credit_interval` steps; its schema, one row per dumped sample:

    {"step": int, "sample_id": str, "prompt": str, "answer": str,
     "tokens": [str, ...],          the response tokens, each decoded on its own
     "credit": [float, ...],        A_t, the token advantage the update used (one per token)
     "delta": [float, ...] | null,  Delta_t = log P_teacher - log P_student of the token
     "advantage": float, "reward": float, "correct": bool}

(megatron_rlsd/credit_dump.py: CreditDumpRow, write_credit_dump). Every token is coloured by its
credit A_t on a diverging map: blue where the update raises the token's probability (A_t > 0),
red where it lowers it (A_t < 0), white at 0; the intensity is the magnitude. With --scale
relative (default) the intensity spans each sample's own range of |A_t| (RLSD's weights move A_t
by at most lambda * eps_w around A, invisible on a shared scale); --scale absolute puts all
samples on one scale, |A_t| / max |A_t|. In the HTML page, hovering a token shows A_t and
Delta_t.

Shown: --per-outcome correct and as many incorrect samples (those with a non-zero advantage
first: a group whose samples all got the same reward carries no credit), or the --sample-id
ones. The PNG shows the first --png-tokens tokens of each.

DIR gets credit_step_NNNNNNN.html and credit_step_NNNNNNN.png. Bad input (no dump, a row that
breaks the schema) stops with one `credit_heatmap: error:` line and exit code 2.
"""

import argparse
import html
import re
import sys
from pathlib import Path

import _bootstrap  # noqa: F401

from megatron_rlsd.credit_dump import CREDIT_SUBDIR, credit_dump_path, read_credit_dump

CMAP = "RdBu"  # red (negative) - white - blue (positive)
LOW = 0.12  # relative scale: the smallest magnitude of a sample still shows its sign


class UsageError(Exception):
    pass


def find_dump(run: Path, step: int | None) -> Path:
    if not run.is_dir():
        raise UsageError(f"--run {run}: no such directory")
    if step is not None:
        path = credit_dump_path(run, step)
        if not path.is_file():
            have = sorted(p.name for p in (run / CREDIT_SUBDIR).glob("step_*.jsonl"))
            raise UsageError(f"{path}: no credit dump for step {step} (dumps: {', '.join(have) or 'none'})")
        return path
    dumps = sorted((run / CREDIT_SUBDIR).glob("step_*.jsonl"))
    if not dumps:
        raise UsageError(f"{run / CREDIT_SUBDIR}: no credit dumps (the trainer writes them every "
                         "trainer.dump_credit_interval steps)")  # fmt: skip
    return dumps[-1]


def select(rows, per_outcome: int, ids: list[str] | None):
    if ids:
        by_id = {r.sample_id: r for r in rows}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise UsageError(f"no sample {missing[0]!r} in the dump (samples: {', '.join(list(by_id)[:10])} ...)")
        return [by_id[i] for i in ids]
    chosen = []
    for outcome in (True, False):
        pool = [r for r in rows if r.correct is outcome]
        pool.sort(key=lambda r: r.advantage == 0)  # stable: file order, credit-carrying first
        chosen += pool[:per_outcome]
    if not chosen:
        raise UsageError("the dump has no samples")
    return chosen


def intensities(rows, scale: str) -> list[list[float]]:
    """Signed colour positions in [-1, 1] per token of each row."""
    out = []
    top = max((abs(c) for r in rows for c in r.credit), default=0.0) or 1.0
    for r in rows:
        mags = [abs(c) for c in r.credit]
        if scale == "absolute":
            vals = [m / top for m in mags]
        else:
            lo, hi = min(mags, default=0.0), max(mags, default=0.0)
            vals = [0.0 if hi == 0 else LOW + (1 - LOW) * ((m - lo) / (hi - lo) if hi > lo else 1.0) for m in mags]
        out.append([v if c >= 0 else -v for v, c in zip(vals, r.credit)])
    return out


def _rgb(cmap, x: float) -> tuple[int, int, int]:
    r, g, b, _ = cmap(0.5 + 0.5 * x)
    return round(255 * r), round(255 * g), round(255 * b)


def _text_color(rgb) -> str:
    r, g, b = rgb
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def _header(r) -> str:
    mark = "correct" if r.correct else "incorrect"
    span = f" | A_t {min(r.credit):+.4f} .. {max(r.credit):+.4f}" if r.credit else ""
    return f"{mark} | {r.sample_id} | reward {r.reward:.3f} | A = {r.advantage:+.4f}{span}"


def write_html(path: Path, rows, colors, dump: Path, scale: str) -> None:
    from matplotlib import colormaps

    cmap = colormaps[CMAP]
    gradient = ", ".join(f"rgb{_rgb(cmap, x / 10)}" for x in range(-10, 11))
    intensity = "each sample's own range of |A<sub>t</sub>|." if scale == "relative" else "|A<sub>t</sub>| on one scale."
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Token credit, step {rows[0].step}</title><style>",
        "body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}",
        ".sample{border:1px solid #ccc;border-radius:6px;padding:10px 14px;margin:14px 0}",
        ".correct h2{color:#1a6d1a}.incorrect h2{color:#a11}h2{font-size:15px;margin:4px 0 8px}",
        ".tokens{font-family:ui-monospace,monospace;font-size:14px;line-height:1.9;white-space:pre-wrap;word-break:break-word}",
        ".tokens span{border-radius:2px;padding:1px 0}.tokens span:hover{outline:1px solid #000}",
        "pre{white-space:pre-wrap;font-size:12px;background:#f6f6f6;padding:6px}",
        f".bar{{height:12px;width:320px;background:linear-gradient(to right,{gradient});border:1px solid #999}}",
        ".legend{display:flex;gap:10px;align-items:center;font-size:13px}</style></head><body>",
        f"<h1 style='font-size:20px'>Token credit A<sub>t</sub>, step {rows[0].step}</h1>",
        f"<p style='font-size:13px'>{html.escape(str(dump))}. Hover a token for A<sub>t</sub> and &Delta;<sub>t</sub> "
        f"(teacher minus student log-prob). Intensity: {intensity}</p>"
        "<div class='legend'><span>A<sub>t</sub> &lt; 0 (lowered)</span><div class='bar'></div>"
        "<span>A<sub>t</sub> &gt; 0 (raised)</span></div>",
    ]
    for r, xs in zip(rows, colors):
        spans = []
        for i, (tok, x) in enumerate(zip(r.tokens, xs)):
            rgb = _rgb(cmap, x)
            delta = "n/a" if r.delta is None else f"{r.delta[i]:+.4f}"
            tip = f"token {i}: {tok!r}\nA_t = {r.credit[i]:+.5f}\nDelta_t = {delta}"
            shown = html.escape(tok.replace("\n", "\u21b5\n"))
            style = f"background:rgb{rgb};color:{_text_color(rgb)}"
            spans.append(f"<span style='{style}' title=\"{html.escape(tip, quote=True)}\">{shown}</span>")
        parts += [
            f"<section class='sample {'correct' if r.correct else 'incorrect'}'><h2>{html.escape(_header(r))}</h2>",
            f"<details><summary>prompt and reference answer</summary><pre>{html.escape(r.prompt)}</pre>",
            f"<p>reference answer: <b>{html.escape(r.answer)}</b></p></details>",
            f"<div class='tokens'>{''.join(spans)}</div></section>",
        ]
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _lines(tokens, colors, width: int):
    """Token cells (line, column, text, colour) wrapped at `width` characters; a newline token
    shows as a return sign and ends its line."""
    cells, line, col = [], 0, 0
    for tok, x in zip(tokens, colors):
        ends_line = tok.endswith("\n")
        text = _CONTROL.sub("\u00b7", tok.replace("\n", "\u21b5").replace("\t", " "))
        while text:
            if col + len(text) > width and col > 0:
                line, col = line + 1, 0
            piece, text = text[:width], text[width:]
            cells.append((line, col, piece, x))
            col += len(piece)
        if ends_line:
            line, col = line + 1, 0
    return cells, line + 1


def write_png(path: Path, rows, colors, max_tokens: int, scale: str, width: int = 96, fontsize: float = 10.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    cmap = colormaps[CMAP]
    blocks = []
    for r, xs in zip(rows, colors):
        cells, n = _lines(r.tokens[:max_tokens], xs[:max_tokens], width)
        more = len(r.tokens) - max_tokens
        blocks.append((r, cells, n, more))
    total = sum(2 + n + (1 if more > 0 else 0) for _, _, n, more in blocks) + 3  # headers, gaps, colorbar
    char_w, line_h = 0.6 * fontsize / 72, 1.75 * fontsize / 72  # inches (monospace advance 0.6 em)
    margin = 0.3
    fig = plt.figure(figsize=(width * char_w + 2 * margin, total * line_h + 2 * margin))
    ax = fig.add_axes((margin / fig.get_figwidth(), margin / fig.get_figheight(),
                       1 - 2 * margin / fig.get_figwidth(), 1 - 2 * margin / fig.get_figheight()))  # fmt: skip
    ax.set_xlim(0, width)
    ax.set_ylim(total, 0)
    ax.axis("off")
    y = 0
    for r, cells, n, more in blocks:
        ax.text(0, y + 0.5, _header(r), va="center", ha="left", fontsize=fontsize, fontweight="bold",
                color="#1a6d1a" if r.correct else "#a11")  # fmt: skip
        y += 1
        for line, col, text, x in cells:
            rgb = _rgb(cmap, x)
            # a hairline gap between tokens shows their boundaries
            ax.add_patch(Rectangle((col + 0.08, y + line + 0.08), len(text) - 0.16, 0.84, facecolor=[c / 255 for c in rgb],
                                   edgecolor="none"))  # fmt: skip
            ax.text(col, y + line + 0.5, text, va="center", ha="left", family="DejaVu Sans Mono", fontsize=fontsize,
                    color=_text_color(rgb))  # fmt: skip
        y += n
        if more > 0:
            ax.text(0, y + 0.5, f"... {more} more tokens (see the HTML page)", va="center", fontsize=fontsize * 0.85, color="#555")
            y += 1
        y += 1
    height = fig.get_figheight()
    cax = fig.add_axes((0.3, (margin + 0.3 * line_h) / height, 0.4, 0.9 * line_h / height))
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(-1, 1))
    bar = fig.colorbar(sm, cax=cax, orientation="horizontal", ticks=[-1, 0, 1])
    what = "relative |A_t| within a sample" if scale == "relative" else "|A_t| / max |A_t|"
    bar.ax.set_xticklabels(["A_t < 0", "0", "A_t > 0"], fontsize=fontsize * 0.8)
    bar.ax.set_title(f"token credit ({what})", fontsize=fontsize * 0.85)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run's output directory")
    p.add_argument("--step", type=int, help="the dump's step (default: the newest dump)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--per-outcome", type=int, default=2, help="correct and incorrect samples shown (each)")
    p.add_argument("--sample-id", action="append", help="show these samples instead (repeatable)")
    p.add_argument("--scale", choices=("relative", "absolute"), default="relative")
    p.add_argument("--png-tokens", type=int, default=160, help="tokens per sample in the PNG")
    args = p.parse_args(argv)
    try:
        if args.per_outcome < 1 or args.png_tokens < 1:
            raise UsageError("--per-outcome and --png-tokens must be >= 1")
        dump = find_dump(Path(args.run), args.step)
        try:
            rows = read_credit_dump(dump)
        except ValueError as e:
            raise UsageError(str(e)) from None
        rows = select(rows, args.per_outcome, args.sample_id)
    except UsageError as e:
        print(f"credit_heatmap: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    colors = intensities(rows, args.scale)
    stem = f"credit_step_{rows[0].step:07d}"
    write_html(out / f"{stem}.html", rows, colors, dump, args.scale)
    write_png(out / f"{stem}.png", rows, colors, args.png_tokens, args.scale)
    print(f"wrote {out / stem}.html and .png ({len(rows)} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
