"""Pure rendering helpers: service data -> HTML/Markdown for the page. No state, no model access."""
from __future__ import annotations

import html
import time

MODE_LABELS = {"ahn": "AHN", "full": "Full attention", "window": "Window only"}
MODE_COLORS = {"ahn": "#16a34a", "full": "#dc2626", "window": "#2563eb"}
PART_LABELS = [("weights", "Weights"), ("window_kv", "Window KV"), ("sinks_kv", "Sinks KV"),
               ("ahn_state", "AHN memory"), ("gate_cache", "AHN gate cache"), ("workspace", "Workspace"),
               ("allocator_reserve", "Allocator reserve")]


def esc(x) -> str:
    return html.escape(str(x))


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def fmt_secs(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    m, s = divmod(int(s), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


# ------------------------------------------------------------------------------------------------ header
def header_html(info: dict, modes: list[str]) -> str:
    bits = [f"<b>{esc(info['name'])}</b>"]
    bits.append(f"AHN {esc(info['variant'])}" if info.get("variant") else "no AHN weights")
    bits.append(f"window {info['window']:,} + {info['sinks']} sinks")
    bits.append(f"{esc(info['device'])} · {esc(info['dtype'])}"
                + (f" · {esc(info['quantization'])}" if info.get("quantization", "none") != "none" else ""))
    notes = []
    if info.get("ahn_missing"):
        notes.append(f"<div class='ahn-note warn' id='ahn-missing'>⚠ {esc(info['ahn_missing'])}</div>")
    for n in info.get("notes", []):
        notes.append(f"<div class='ahn-note'>{esc(n)}</div>")
    return (f"<div id='app-header'><h1>Long-document chat <span class='sub'>AHN runtime</span></h1>"
            f"<div class='model-line'>{' · '.join(bits)}</div>{''.join(notes)}</div>")


def presets_md(options: list[dict]) -> str:
    """The model menu's entries (ModelService.options) as a table: what each is and needs on this machine."""
    rows = ["| model | base + AHN | window + sinks | here |", "|---|---|---|---|"]
    for o in options:
        here = "**loaded**" if o["loaded"] else (o["status"] if o["available"] else f"✖ {o['reason']}")
        if o["needs"] and o["available"]:
            here += " · " + "; ".join(o["needs"])
        ahn = o.get("variant") or ("our AHN" if o["id"] != "launched" else "no AHN weights")
        rows.append(f"| `{o['name']}` | {o['base_name']} + {ahn} | {o['window']:,} + {o['sinks']} | {here} |")
    return ("\n".join(rows) + "\n\nChoose a model above and press **Load** (one model is loaded at a time; "
            "documents are processed again for it at the next question). Any other base + AHN pair: "
            "`python launch.py --base ID_OR_PATH --ahn DIR`.")


# ------------------------------------------------------------------------------------------------ progress
STAGES = {"extract": "1 · Extracting pages", "tokens": "2 · Counting tokens", "prefill": "3 · Processing (prefill)"}


def progress_html(ev, started: float | None = None) -> str:
    frac = ev.done / ev.total if ev.total else 0.0
    detail = f"{ev.done:,} / {ev.total:,} {ev.unit}"
    if ev.stage == "prefill":
        if getattr(ev, "chunks", None):
            detail += f" · chunk {ev.chunk} of {ev.chunks}"
        if ev.rate:
            detail += f" · {ev.rate:,.0f} tokens/s"
        if ev.eta is not None and ev.done < ev.total:
            detail += f" · ETA {fmt_secs(ev.eta)}"
    side = f"[{MODE_LABELS.get(ev.side, ev.side)}] " if getattr(ev, "side", None) else ""
    return (f"<div class='progress' data-stage='{ev.stage}'><div class='progress-label'>{side}"
            f"<b>{esc(STAGES.get(ev.stage, ev.stage))}</b> — {esc(ev.label)}</div>"
            f"<div class='bar'><div class='fill' style='width:{100 * frac:.1f}%'></div></div>"
            f"<div class='progress-detail'>{esc(detail)}</div></div>")


def status_line(level: str, text: str) -> str:
    return f"<div class='msg {level}'>{esc(text)}</div>"


def status_html(lines: list[tuple[str, str]], progress: str = "", box_id: str = "status-box") -> str:
    """lines: (level, text) with level info|warning|error|ok."""
    icons = {"info": "", "warning": "⚠", "error": "✖", "ok": "✓"}
    items = "".join(f"<div class='msg {lvl}'>{icons.get(lvl, '')} {esc(t)}</div>" for lvl, t in lines[-8:])
    return f"<div id='{box_id}'>{progress}{items}</div>"


# ------------------------------------------------------------------------------------------------ documents
def documents_html(summary: dict | None, mode: str | None) -> str:
    if not summary:
        return "<div id='documents'><i>No documents yet. Add PDFs, .txt or .md files above.</i></div>"
    out = ["<div id='documents'>"]
    docs = summary.get("documents", [])
    if docs:
        out.append("<table class='doc-table'><tr><th>Document</th><th>Pages</th><th>Tokens</th>"
                   "<th>No text layer</th></tr>")
        for d in docs:
            empty = d.get("pages_without_text") or []
            shown = ", ".join(empty[:8]) + (f" +{len(empty) - 8}" if len(empty) > 8 else "")
            out.append(f"<tr><td title='{esc(d['sha256'])}'>{esc(d['name'])}</td><td>{d['pages']}</td>"
                       f"<td>{d['tokens']:,}</td><td class='{'warn' if empty else ''}'>"
                       f"{esc(shown) if empty else '—'}</td></tr>")
        out.append(f"<tr class='total'><td>Total</td><td>{sum(d['pages'] for d in docs)}</td>"
                   f"<td>{summary.get('total_tokens', 0):,}</td><td></td></tr></table>")
        if summary.get("prompt_tokens"):
            out.append(f"<div class='small'>Prompt with instructions: {summary['prompt_tokens']:,} tokens.</div>")
    else:
        out.append("<i>No documents in this chat.</i>")
    for e in summary.get("errors", []):
        out.append(f"<div class='msg {'warning' if e['kind'] == 'password' else 'error'}'>"
                   f"{'Locked:' if e['kind'] == 'password' else '✖'} {esc(e['error'])}</div>")
    budgets = summary.get("budgets", {})
    if budgets:
        out.append("<div class='budgets'><b>Token budget by mode</b>")
        for m, b in budgets.items():
            cls = "budget" + (" current" if m == mode else "") + ("" if b.get("fits", True) else " over")
            out.append(f"<div class='{cls}' data-mode='{m}'><b>{MODE_LABELS.get(m, m)}:</b> {esc(b['message'])}"
                       f"{' ✓ processed' if m in summary.get('processed_modes', []) else ''}</div>")
        out.append("</div>")
    out.append("</div>")
    return "".join(out)


# ------------------------------------------------------------------------------------------------ chat
def stats_line(meta: dict) -> str:
    if not meta or meta.get("error"):
        return ""
    bits = [MODE_LABELS.get(meta.get("mode"), meta.get("mode", ""))]
    if meta.get("ttft_s") is not None:
        bits.append(f"first token {fmt_secs(meta['ttft_s'])}")
    if meta.get("tokens_per_s"):
        bits.append(f"{meta['tokens_per_s']:.1f} tokens/s")
    bits.append(f"{meta.get('tokens', 0)} tokens")
    if meta.get("peak_memory_bytes"):
        bits.append(f"peak {fmt_bytes(meta['peak_memory_bytes'])}")
    if meta.get("citations"):
        bits.append("cites p. " + ", ".join(meta["citations"][:12]))
    if meta.get("stopped"):
        bits.append("stopped by you")
    return " · ".join(bits)


def chat_messages(messages, pending_question: str | None = None, pending_answer: str | None = None) -> list[dict]:
    """Session messages (ChatMessage) -> gr.Chatbot messages."""
    out = []
    for m in messages:
        content = m.content
        if m.role == "assistant":
            if m.meta.get("error"):
                content = f"✖ {m.content}"
            else:
                line = stats_line(m.meta)
                content = (m.content or "*(empty answer)*") + (f"\n\n<sub>{esc(line)}</sub>" if line else "")
        out.append({"role": m.role, "content": content})
    if pending_question is not None:
        out.append({"role": "user", "content": pending_question})
        out.append({"role": "assistant", "content": pending_answer or "…"})
    return out


# ------------------------------------------------------------------------------------------------ compare
def compare_html(result: dict | None, live: dict | None = None) -> str:
    """result: {"question", "sides": {mode: {"text", "stats"} | {"error"}}}; live: {mode: text or status}."""
    if not result and not live:
        return ""
    q = (result or {}).get("question", "")
    sides = dict((result or {}).get("sides", {}))
    cols = []
    for mode in ("ahn", "full"):
        s = sides.get(mode)
        body, stats = "", ""
        if s is None:
            body = f"<i>{esc((live or {}).get(mode, 'waiting…'))}</i>"
        elif s.get("error"):
            body = f"<div class='msg error'>✖ {esc(s['error'])}</div>"
        else:
            st = s["stats"]
            body = esc(s["text"] or "(empty answer)").replace("\n", "<br>")
            stats = (f"<table class='cmp-stats'><tr><td>Time to first token</td><td>{fmt_secs(st['ttft_s'])}</td></tr>"
                     f"<tr><td>Tokens/s</td><td>{st['tokens_per_s'] or '–'}</td></tr>"
                     f"<tr><td>Peak memory</td><td>{fmt_bytes(st['peak_memory_bytes'])}</td></tr>"
                     f"<tr><td>Peak state (KV + memory)</td><td>{fmt_bytes(st['peak_state_bytes'])}</td></tr>"
                     f"<tr><td>Prompt tokens</td><td>{st['prompt_tokens']:,}</td></tr></table>")
        if s is None and live and mode in live and not str(live[mode]).startswith("…"):
            body = esc(live[mode]).replace("\n", "<br>")
        cols.append(f"<div class='cmp-col' data-mode='{mode}'><h3 style='color:{MODE_COLORS[mode]}'>"
                    f"{MODE_LABELS[mode]}</h3><div class='cmp-answer'>{body}</div>{stats}</div>")
    return (f"<div id='compare'><div class='cmp-q'><b>Compare:</b> {esc(q)}</div>"
            f"<div class='cmp-cols'>{''.join(cols)}</div></div>")


# ------------------------------------------------------------------------------------------------ memory
def _plot_svg(series: dict, w: int = 300, h: int = 150) -> str:
    pad_l, pad_b, pad_t, pad_r = 54, 22, 8, 8
    pts_all = [p for pts in series.values() for p in pts]
    if not pts_all:
        return (f"<svg id='mem-plot' width='{w}' height='{h}' viewBox='0 0 {w} {h}'><text x='{w / 2}' y='{h / 2}' "
                "text-anchor='middle' class='axis'>memory vs tokens: no data yet</text></svg>")
    max_x = max(p[0] for p in pts_all) or 1
    max_y = max(p[1] for p in pts_all) or 1
    iw, ih = w - pad_l - pad_r, h - pad_t - pad_b

    def sx(x):
        return pad_l + iw * x / max_x

    def sy(y):
        return pad_t + ih * (1 - y / max_y)

    lines = []
    for mode, pts in series.items():
        pts = sorted(pts)
        if not pts:
            continue
        coords = [(p[0], p[1]) for p in pts]
        if len(coords) == 1:
            coords.append((coords[0][0] + max_x / 100, coords[0][1]))  # a dot would be invisible
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in coords)
        color = MODE_COLORS.get(mode, "#555")
        lines.append(f"<polyline data-mode='{mode}' points='{path}' fill='none' stroke='{color}' stroke-width='2'/>")
    legend = "".join(f"<tspan fill='{MODE_COLORS.get(m, '#555')}'> ● {MODE_LABELS.get(m, m)}</tspan>" for m in series)
    return (f"<svg id='mem-plot' width='100%' viewBox='0 0 {w} {h}' data-points='{len(pts_all)}'>"
            f"<line x1='{pad_l}' y1='{pad_t + ih}' x2='{w - pad_r}' y2='{pad_t + ih}' class='ax'/>"
            f"<line x1='{pad_l}' y1='{pad_t}' x2='{pad_l}' y2='{pad_t + ih}' class='ax'/>"
            f"<text x='{pad_l - 4}' y='{pad_t + 8}' text-anchor='end' class='axis'>{fmt_bytes(max_y)}</text>"
            f"<text x='{pad_l - 4}' y='{pad_t + ih}' text-anchor='end' class='axis'>0</text>"
            f"<text x='{w - pad_r}' y='{h - 6}' text-anchor='end' class='axis'>{max_x:,} tokens</text>"
            f"<text x='{pad_l + 2}' y='{h - 6}' class='axis'>{legend}</text>"
            f"{''.join(lines)}</svg>")


def memory_html(snap: dict) -> str:
    used, total = snap["device_used"], snap["device_total"]
    frac = used / total if total else 0
    dev = "GPU memory" if snap["device"].startswith("cuda") else "RAM (this process)"
    parts = snap["parts"]
    biggest = max([v for v in parts.values()] + [1])
    rows = []
    for key, label in PART_LABELS:
        v = parts.get(key, 0)
        if key in ("gate_cache", "allocator_reserve", "workspace") and not v:
            continue
        rows.append(f"<tr data-part='{key}'><td>{label}</td><td class='num'>{fmt_bytes(v)}</td>"
                    f"<td class='barcell'><div class='pbar' style='width:{100 * v / biggest:.1f}%'></div></td></tr>")
    t = snap["tokens"]
    mode = snap.get("mode")
    where = ""
    if mode == "ahn":
        where = (f"<tr><td>Compressed into AHN memory</td><td class='num' id='tok-compressed'>"
                 f"{t['compressed']:,}</td></tr>")
    elif mode == "window":
        where = (f"<tr><td>Dropped (outside the window)</td><td class='num' id='tok-dropped'>"
                 f"{t['dropped']:,}</td></tr>")
    phase = snap.get("phase", "idle")
    live = "<span class='live-dot'></span>" if snap.get("live") else ""
    last = snap.get("last_generation") or {}
    last_line = ""
    if last:
        last_line = f"<div class='small'>Last answer: {esc(stats_line(last))}</div>"
    q = snap.get("waiting", 0)
    return (
        f"<div id='memory' data-tokens='{t['processed']}' data-updated='{snap['time']:.1f}'>"
        f"<div class='mem-title'>{live}<b>Memory</b> <span class='small'>· {esc(phase)}"
        f"{' · mode ' + MODE_LABELS.get(mode, mode) if mode else ''}"
        f"{f' · {q} waiting' if q else ''} · {time.strftime('%H:%M:%S', time.localtime(snap['time']))}</span></div>"
        f"<div class='dev'>{dev}: <b id='dev-used'>{fmt_bytes(used)}</b> of {fmt_bytes(total)}"
        f"<div class='bar'><div class='fill' style='width:{100 * frac:.1f}%'></div></div></div>"
        f"<table class='parts'>{''.join(rows)}</table>"
        f"<table class='tokens'><tr><td>Tokens processed</td>"
        f"<td class='num' id='tok-processed'>{t['processed']:,}</td></tr>"
        f"<tr><td>In attention (window + sinks)</td><td class='num' id='tok-window'>{t['in_window']:,}</td></tr>"
        f"{where}</table>"
        f"<div class='small'>Window {snap['window']:,} + {snap['sinks']} sinks. State in use vs tokens "
        f"processed:</div>{_plot_svg(snap.get('series', {}))}{last_line}</div>")


CSS = """
#app-header h1 {margin: 0 0 4px 0; font-size: 1.5em}
#app-header .sub {font-size: 0.6em; color: #6b7280; font-weight: normal}
#app-header .model-line {color: #374151; font-size: 0.95em}
.ahn-note {margin-top: 6px; padding: 6px 10px; border-radius: 6px; background: #eff6ff; font-size: 0.9em}
.ahn-note.warn {background: #fff7ed; border: 1px solid #fdba74}
.progress {margin: 6px 0}
.progress .bar, #memory .bar {height: 8px; background: #e5e7eb; border-radius: 4px; overflow: hidden; margin: 3px 0}
.progress .fill {height: 100%; background: #2563eb; transition: width .2s}
#memory .fill {height: 100%; background: #7c3aed}
.progress-detail, .small {font-size: 0.85em; color: #4b5563}
.msg {font-size: 0.9em; margin: 3px 0; padding: 3px 6px; border-radius: 4px}
.msg.warning {background: #fff7ed} .msg.error {background: #fef2f2} .msg.ok {background: #f0fdf4}
.doc-table {width: 100%; font-size: 0.9em; border-collapse: collapse; border: none}
.doc-table td, .doc-table th {padding: 2px 4px; border: none; border-bottom: 1px solid #e5e7eb; text-align: left}
.doc-table td.warn {color: #b45309}
.doc-table tr.total td {font-weight: bold}
.budgets {margin-top: 8px; font-size: 0.88em}
.budget {padding: 3px 6px; margin: 2px 0; border-radius: 4px; color: #4b5563}
.budget.current {background: #eef2ff; color: #111827}
.budget.over {background: #fef2f2; color: #991b1b}
#memory {font-size: 0.9em}
#memory table {width: 100%; border-collapse: collapse; margin: 4px 0}
#memory table, #memory td, #compare table, #compare td, .doc-table, .doc-table td, .doc-table th
  {border: none !important}
#compare td, .doc-table td, .doc-table th {border-bottom: 1px solid #e5e7eb !important}
#memory td {padding: 1px 4px; border-bottom: 1px solid #f3f4f6}
#memory td.num {text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums}
#memory td.barcell {width: 35%}
#memory .pbar {height: 8px; background: #a78bfa; border-radius: 3px; min-width: 1px}
#memory .axis {font-size: 9px; fill: #6b7280}
#memory .ax {stroke: #9ca3af; stroke-width: 1}
.live-dot {display: inline-block; width: 8px; height: 8px; border-radius: 50%; background: #16a34a;
           margin-right: 4px; animation: pulse 1s infinite}
@keyframes pulse {50% {opacity: .3}}
#compare .cmp-cols {display: flex; gap: 12px}
#compare .cmp-col {flex: 1; border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px; min-width: 0}
#compare .cmp-col h3 {margin: 0 0 4px 0}
#compare .cmp-answer {white-space: normal; margin-bottom: 6px; overflow-wrap: anywhere; max-height: 320px;
  overflow-y: auto}
#compare .cmp-stats td {padding: 1px 6px; font-size: 0.88em}
"""
