"""The swarm view as a terminal table (`swarmnet status`) and as the coordinator's HTML status page.

The page is one self-contained document: inline CSS, the loss curve as inline SVG, no scripts and
no external assets, refreshed by the browser every few seconds.
"""

from __future__ import annotations

import datetime
import html
import math

from swarmnet.coordinator.view import LossPoint, PeerView, SwarmEvent, SwarmView, short_id

# --- terminal -------------------------------------------------------------------------------------


def render_text(view: SwarmView) -> str:
    lines = [
        f"run {view.run_id} ({view.name}): {len(view.stages)} stages, {len(view.peers)} peers, {len(view.trainers)} trainers",
        f"global step {view.global_step}   capacity {view.capacity:.1f} samples/s   "
        f"trainers {view.samples_per_s:.1f} samples/s   balance {view.balance_ratio:.2f}",
        "",
        f"{'stage':>5}  {'peer':<10} {'samples/s':>10} {'queue':>5} {'step':>6}  {'device':<8} {'failed':>6}  metrics",
    ]
    bottleneck = view.bottleneck
    for stage in view.stages:
        mark = "  ← bottleneck" if stage.stage == bottleneck and len(view.stages) > 1 else ""
        lines.append(f"{stage.stage:>5}  {'total':<10} {stage.throughput:>10.1f} {'':>5} {stage.step:>6}{mark}")
        if not stage.peers:
            lines.append(f"{'':>5}  (no peers)")
        for peer in stage.peers:
            lines.append(_peer_line("", peer))
    for expert in view.experts:
        if expert is view.experts[0]:
            lines += ["", f"{'expert':<14} {'peer':<10} {'tokens/s':>10} {'queue':>5} {'step':>6}  {'device':<8} {'failed':>6}  metrics"]
        if not expert.peers:
            lines.append(f"{expert.uid:<14} (no peers)")
        for peer in expert.peers:
            lines.append(_peer_line(f"{expert.uid:<14}", peer, width=0))
    if view.trainers:
        lines += ["", f"{'trainer':<10} {'step':>6} {'loss':>8} {'samples/s':>10}  metrics"]
        for t in view.trainers:
            lines.append(f"{short_id(t.peer_id):<10} {t.step:>6} {_loss(t.loss):>8} {t.samples_per_s:>10.1f}  {t.metrics_addr or '-'}")
    return "\n".join(lines)


def _peer_line(prefix: str, peer: PeerView, width: int = 5) -> str:
    head = f"{prefix:>{width}}  " if width else f"{prefix} "
    return (
        f"{head}{short_id(peer.peer_id):<10} {peer.throughput:>10.1f} {peer.queue_depth:>5} {peer.step:>6}  "
        f"{peer.device:<8} {peer.failed_rounds:>6}  {peer.metrics_addr or '-'}"
    )


def _loss(loss: float) -> str:
    return f"{loss:.4f}" if math.isfinite(loss) else str(loss)


# --- HTML -----------------------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 24px}header h1{margin:0;font-size:20px}
header .sub{color:#aab3c5;font-size:13px}main{padding:16px 24px;display:grid;gap:16px;
grid-template-columns:repeat(auto-fit,minmax(460px,1fr))}section{background:#fff;border-radius:8px;
padding:12px 16px;box-shadow:0 1px 2px rgba(0,0,0,.08)}h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eceef2;
font-variant-numeric:tabular-nums}th{color:#5b6477;font-weight:600}td.n,th.n{text-align:right}
.kpis{display:flex;flex-wrap:wrap;gap:12px}.kpi{background:#f0f3f8;border-radius:6px;padding:8px 12px;min-width:110px}
.kpi b{display:block;font-size:20px}.kpi span{color:#5b6477;font-size:12px}
.bottleneck{background:#fff4e5}.empty{color:#b3261e;font-weight:600}.fail{color:#b3261e}.info{color:#5b6477}
#bottleneck{font-size:15px}svg text{font-size:11px;fill:#5b6477}
"""


def render_html(view: SwarmView | None, points: list[LossPoint], events: list[SwarmEvent], *, refresh: int = 5) -> str:
    if view is None:
        body = '<main><section id="summary"><h2>Waiting for the first observation of the swarm…</h2></section></main>'
        title = "swarmnet"
        sub = ""
    else:
        title = f"swarmnet · {html.escape(view.name)}"
        observed = datetime.datetime.fromtimestamp(view.observed_at).strftime("%H:%M:%S")
        sub = f"run {html.escape(view.run_id)} · observed {observed}"
        body = "<main>" + "".join(
            [_summary(view), _stages(view), _loss_chart(points), _experts(view), _trainers(view), _events(events)]
        ) + "</main>"
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="refresh" content="{int(refresh)}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{title}</title><style>{_STYLE}</style></head><body>"
        f'<header><h1>{title}</h1><div class="sub">{sub}</div></header>{body}</body></html>'
    )


def _summary(view: SwarmView) -> str:
    b = view.bottleneck
    kpis = [
        ("global step", f"{view.global_step}"),
        ("trainers' samples/s", f"{view.samples_per_s:.1f}"),
        ("capacity samples/s", f"{view.capacity:.1f}"),
        ("balance", f"{view.balance_ratio:.2f}"),
        ("peers", f"{len(view.peers)}"),
        ("trainers", f"{len(view.trainers)}"),
    ]
    if b is None:
        bottleneck = "no stages"
    elif not view.stages[b].peers:
        bottleneck = f'<span class="empty">stage {b} has no peers: the pipeline is stopped</span>'
    else:
        bottleneck = f"bottleneck: stage {b} at {view.stages[b].throughput:.1f} samples/s"
    cells = "".join(f'<div class="kpi"><b>{v}</b><span>{k}</span></div>' for k, v in kpis)
    return f'<section id="summary"><h2>Swarm</h2><div class="kpis">{cells}</div><p id="bottleneck">{bottleneck}</p></section>'


def _stages(view: SwarmView) -> str:
    rows = []
    for stage in view.stages:
        cls = ' class="bottleneck"' if stage.stage == view.bottleneck and len(view.stages) > 1 else ""
        rows.append(
            f'<tr{cls} data-stage="{stage.stage}"><th>stage {stage.stage}</th><td class="n">{_peers(len(stage.peers))}</td>'
            f'<td class="n">{stage.throughput:.1f}</td><td class="n">{stage.step}</td><td></td><td></td></tr>'
        )
        if not stage.peers:
            rows.append('<tr><td></td><td class="empty" colspan="5">no peers</td></tr>')
        for peer in stage.peers:
            rows.append(_peer_row(peer))
    head = '<tr><th></th><th class="n">peer</th><th class="n">samples/s</th><th class="n">step</th><th>device</th><th>queue</th></tr>'
    return f'<section><h2>Stages</h2><table id="stages">{head}{"".join(rows)}</table></section>'


def _peers(n: int) -> str:
    return f"{n} peer" if n == 1 else f"{n} peers"


def _peer_row(peer: PeerView) -> str:
    return (
        f'<tr class="peer" data-peer="{html.escape(peer.peer_id)}"><td></td><td class="n" title="{html.escape(peer.peer_id)}">'
        f'{html.escape(short_id(peer.peer_id))}</td><td class="n">{peer.throughput:.1f}</td><td class="n">{peer.step}</td>'
        f"<td>{html.escape(peer.device)}</td><td>{peer.queue_depth}</td></tr>"
    )


def _experts(view: SwarmView) -> str:
    if not view.experts:
        return ""
    rows = []
    for expert in view.experts:
        cls = "" if expert.peers else ' class="empty"'
        tokens = sum(p.throughput for p in expert.peers)
        rows.append(
            f'<tr data-expert="{html.escape(expert.uid)}"><th>{html.escape(expert.uid)}</th>'
            f'<td class="n"{cls}>{_peers(len(expert.peers))}</td><td class="n">{tokens:.1f}</td></tr>'
        )
    head = '<tr><th>expert</th><th class="n">peers</th><th class="n">tokens/s</th></tr>'
    return f'<section><h2>Experts</h2><table id="experts">{head}{"".join(rows)}</table></section>'


def _trainers(view: SwarmView) -> str:
    rows = "".join(
        f'<tr><td title="{html.escape(t.peer_id)}">{html.escape(short_id(t.peer_id))}</td><td class="n">{t.step}</td>'
        f'<td class="n">{html.escape(_loss(t.loss))}</td><td class="n">{t.samples_per_s:.1f}</td></tr>'
        for t in view.trainers
    ) or '<tr><td colspan="4" class="info">no trainer is reporting</td></tr>'
    head = '<tr><th>trainer</th><th class="n">step</th><th class="n">loss</th><th class="n">samples/s</th></tr>'
    return f'<section><h2>Trainers</h2><table id="trainers">{head}{rows}</table></section>'


def _events(events: list[SwarmEvent]) -> str:
    recent = list(reversed(events))[:30]
    items = "".join(
        f'<li class="{"fail" if e.failure else "info"}" data-kind="{e.kind}">'
        f'{datetime.datetime.fromtimestamp(e.at).strftime("%H:%M:%S")} {html.escape(e.message)}</li>'
        for e in recent
    ) or '<li class="info">nothing happened yet</li>'
    failures = sum(e.failure for e in events)
    return f'<section><h2>Recent events ({failures} failures)</h2><ul id="failures">{items}</ul></section>'


def _loss_chart(points: list[LossPoint], width: int = 440, height: int = 180) -> str:
    finite = [p for p in points if math.isfinite(p.loss)]
    pad = 34
    svg = [f'<svg id="loss-chart" viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="training loss over steps">']
    if len(finite) < 2:
        svg.append(f'<text x="{pad}" y="{height / 2}">the loss curve appears after two reported steps</text>')
    else:
        steps = [p.step for p in finite]
        losses = [p.loss for p in finite]
        x0, x1 = min(steps), max(steps)
        y0, y1 = min(losses), max(losses)
        x1 = x1 if x1 > x0 else x0 + 1
        y1 = y1 if y1 > y0 else y0 + 1e-6

        def xy(p: LossPoint) -> str:
            x = pad + (p.step - x0) / (x1 - x0) * (width - pad - 8)
            y = 8 + (y1 - p.loss) / (y1 - y0) * (height - pad - 8)
            return f"{x:.1f},{y:.1f}"

        colors = ["#2962ff", "#e8710a", "#188038", "#a142f4"]
        for i, trainer in enumerate(sorted({p.trainer for p in finite})):
            line = " ".join(xy(p) for p in finite if p.trainer == trainer)
            svg.append(f'<polyline class="loss" fill="none" stroke="{colors[i % len(colors)]}" stroke-width="2" points="{line}"/>')
        svg.append(f'<line x1="{pad}" y1="{height - pad + 4}" x2="{width - 8}" y2="{height - pad + 4}" stroke="#ccd"/>')
        svg.append(f'<text x="2" y="14">{y1:.3f}</text><text x="2" y="{height - pad}">{y0:.3f}</text>')
        svg.append(f'<text x="{pad}" y="{height - 8}">step {x0}</text>')
        svg.append(f'<text x="{width - 8}" y="{height - 8}" text-anchor="end">step {x1}</text>')
    svg.append("</svg>")
    return f'<section><h2>Loss</h2>{"".join(svg)}</section>'
