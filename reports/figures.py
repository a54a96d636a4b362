"""Plotly drawing only: one function per figure, each taking its reports.data function's output
and returning a `plotly.graph_objects.Figure`. plotly is imported inside the functions.

Every figure draws SVG traces (no WebGL), so it renders in any browser, offline, without a GPU.
"""

from __future__ import annotations

import math
from typing import Any

FONT = "system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif"
BLUE, ORANGE, RED, GREY, GREEN = "#1f6feb", "#e8590c", "#c92a2a", "#adb5bd", "#2b8a3e"
INFEASIBLE_COLORS = ["#868e96", "#f08c00", "#9c36b5"]
PALETTE = ["#1f6feb", "#e8590c", "#2b8a3e", "#862e9c", "#c92a2a", "#0b7285", "#5c940d", "#a61e4d"]


def log_range(values, pad: float = 0.15) -> list[float] | None:
    """A log axis' range (log10 units) that fits `values` with a small margin."""
    v = [float(x) for x in values if x and x > 0]
    if not v:
        return None
    return [math.log10(min(v)) - pad, math.log10(max(v)) + pad]


def _layout(fig, *, height: int = 360, **kw: Any):
    base = {"template": "plotly_white", "height": height, "font": {"family": FONT, "size": 12},
            "margin": {"l": 60, "r": 20, "t": 30, "b": 50},
            "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
            "hoverlabel": {"font": {"family": FONT}}}
    fig.update_layout(**{**base, **kw})
    return fig


def activation_heatmap(d: dict):
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(
        z=d["z"], x=d["experts"], y=d["layers"], colorscale="Blues", zmin=0,
        colorbar={"title": {"text": "% of layer's<br>activations"}},
        hovertemplate="layer %{y}, expert %{x}: %{z:.2f} % of the layer's activations<extra></extra>"))
    n_layers = len(d["layers"])
    _layout(fig, height=min(720, max(280, 22 * n_layers + 140)))
    fig.update_xaxes(title_text="expert", showgrid=False)
    fig.update_yaxes(title_text="MoE layer", autorange="reversed", showgrid=False)
    return fig


def frequency_distribution(d: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, row in enumerate(d["per_layer"]):
        fig.add_trace(go.Scatter(x=d["x_percent"], y=row, mode="lines", line={"color": GREY, "width": 1},
                                 opacity=0.6, name="each layer", legendgroup="layers",
                                 showlegend=i == 0,
                                 hovertemplate=f"layer {i}: " + "%{x:.0f} % of experts carry "
                                               "%{y:.1f} % of activations<extra></extra>"))
    fig.add_trace(go.Scatter(x=d["x_percent"], y=d["mean"], mode="lines+markers", name="mean over layers",
                             line={"color": BLUE, "width": 3}, marker={"size": 5},
                             hovertemplate="%{x:.0f} % of experts carry %{y:.1f} %<extra>mean</extra>"))
    fig.add_trace(go.Scatter(x=[0, 100], y=[0, 100], mode="lines", name="uniform routing",
                             line={"color": "#495057", "dash": "dot", "width": 1}, hoverinfo="skip"))
    if d.get("slots_per_layer"):
        x = min(100.0, d["slots_per_layer"] / d["num_experts"] * 100.0)
        fig.add_vline(x=x, line={"color": ORANGE, "dash": "dash"},
                      annotation_text=f"chosen cache: {d['slots_per_layer']:.1f} slots/layer",
                      annotation_position="bottom right")
    _layout(fig)
    fig.update_xaxes(title_text="share of a layer's experts, hottest first (%)", range=[0, 100])
    fig.update_yaxes(title_text="share of the layer's activations (%)", range=[0, 101])
    return fig


def transfer(d: dict):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12)
    for i, s in enumerate(d["series"]):
        color = PALETTE[i % len(PALETTE)]
        err = {"type": "data", "symmetric": False, "color": color, "thickness": 1,
               "array": [hi - m for hi, m in zip(s["p90_ms"], s["median_ms"])],
               "arrayminus": [m - lo for lo, m in zip(s["p10_ms"], s["median_ms"])]}
        fig.add_trace(go.Scatter(x=s["mib"], y=s["median_ms"], error_y=err, mode="lines+markers",
                                 name=s["name"], line={"color": color}, legendgroup=s["name"],
                                 hovertemplate="%{x:.3g} MiB: %{y:.3g} ms (median; bars p10-p90)"
                                               "<extra>" + s["name"] + "</extra>"), row=1, col=1)
        fig.add_trace(go.Scatter(x=s["mib"], y=s["gbps"], mode="lines+markers", name=s["name"],
                                 line={"color": color}, legendgroup=s["name"], showlegend=False,
                                 hovertemplate="%{x:.3g} MiB: %{y:.1f} GB/s<extra>" + s["name"]
                                               + "</extra>"), row=1, col=2)
    e = d.get("expert")
    xs = [x for s in d["series"] for x in s["mib"] if x > 0] + ([e["mib"]] if e else [])
    if e:
        # A shape on a log axis takes data units, an annotation log10 units: drawing the label
        # with add_vline's annotation_text put it at 10^(MiB) and stretched the axis to 10^29.
        label = f"one expert: {e['mib']:.3g} MiB" + (f", {e['copy_ms']:.3g} ms" if e.get("copy_ms") else "")
        for col in (1, 2):
            fig.add_vline(x=e["mib"], line={"color": ORANGE, "dash": "dash"}, row=1, col=col)
        fig.add_annotation(x=math.log10(e["mib"]), y=1, xref="x", yref="y domain", text=label,
                           showarrow=False, xanchor="left", yanchor="top", xshift=4,
                           font={"color": ORANGE}, bgcolor="rgba(255,255,255,0.85)")
    _layout(fig, height=380)
    x_range = log_range(xs)
    fig.update_xaxes(type="log", dtick=1, title_text="copy size (MiB)", range=x_range)
    fig.update_yaxes(type="log", dtick=1, title_text="host→GPU copy time (ms)", row=1, col=1)
    fig.update_yaxes(title_text="bandwidth (GB/s, 10⁹ bytes/s)", rangemode="tozero", row=1, col=2)
    return fig


def kernel(d: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, s in enumerate(d["series"]):
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(
            x=s["tokens"], y=s["median_ms"], mode="lines+markers", name=s["name"], line={"color": color},
            error_y={"type": "data", "symmetric": False, "color": color, "thickness": 1,
                     "array": [hi - m for hi, m in zip(s["p90_ms"], s["median_ms"])],
                     "arrayminus": [m - lo for lo, m in zip(s["p10_ms"], s["median_ms"])]},
            hovertemplate="%{x} tokens: %{y:.3g} ms<extra>" + s["name"] + "</extra>"))
    _layout(fig)
    ticks = sorted({t for s in d["series"] for t in s["tokens"]})
    fig.update_xaxes(type="log", tickvals=ticks, ticktext=[str(t) for t in ticks],
                     title_text="tokens in the batch")
    fig.update_yaxes(title_text="GPU time (ms, median; bars p10-p90)", rangemode="tozero")
    return fig


def predictor(d: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    same = d["recall"] == d["precision"]  # k predicted for k chosen: one line, named for both
    series = [("recall = precision", "recall", BLUE)] if same else [("recall", "recall", BLUE),
                                                                     ("precision", "precision", ORANGE)]
    for label, col, color in series:
        s = d[col]
        fig.add_trace(go.Scatter(
            x=d["lookahead"], y=s["mean"], mode="lines+markers",
            name=f"{label} (mean over layers; bars min-max)", showlegend=True,
            line={"color": color, "width": 2}, marker={"size": 8},
            error_y={"type": "data", "symmetric": False, "color": color, "thickness": 1,
                     "array": [hi - m for hi, m in zip(s["max"], s["mean"])],
                     "arrayminus": [m - lo for lo, m in zip(s["min"], s["mean"])]},
            hovertemplate="%{x} layers ahead: %{y:.1f} %<extra>" + label + "</extra>"))
    _layout(fig)
    fig.update_xaxes(title_text="lookahead (layers ahead)", dtick=1)
    fig.update_yaxes(title_text="predicted right (%)", range=[0, 105])
    return fig


def history(d: dict):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    objs = d["objectives"]
    fig = make_subplots(rows=len(objs), cols=1, shared_xaxes=True, vertical_spacing=0.08)
    for r, o in enumerate(objs, start=1):
        sc = o["scale"]
        feas = [i for i, f in enumerate(o["feasible"]) if f]
        infeas = [i for i, f in enumerate(o["feasible"]) if not f]
        fig.add_trace(go.Scatter(x=[o["trial"][i] for i in feas], y=[o["value"][i] * sc for i in feas],
                                 mode="markers", name="feasible trial", legendgroup="f", showlegend=r == 1,
                                 marker={"color": BLUE, "size": 7},
                                 hovertemplate="trial %{x}: %{y:.4g}<extra></extra>"), row=r, col=1)
        labels = o.get("infeasible_label") or ["infeasible"] * len(o["trial"])
        for k, label in enumerate(sorted({labels[i] or "infeasible" for i in infeas})):
            idx = [i for i in infeas if (labels[i] or "infeasible") == label]
            fig.add_trace(go.Scatter(x=[o["trial"][i] for i in idx],
                                     y=[o["value"][i] * sc for i in idx], mode="markers",
                                     name=label, legendgroup=label, showlegend=r == 1,
                                     marker={"color": INFEASIBLE_COLORS[k % len(INFEASIBLE_COLORS)],
                                             "symbol": "x", "size": 7},
                                     hovertemplate="trial %{x}: %{y:.4g} (" + label + ")<extra></extra>"),
                          row=r, col=1)
        best = [b * sc if b is not None else None for b in o["best_so_far"]]
        fig.add_trace(go.Scatter(x=o["trial"], y=best,
                                 mode="lines", line={"shape": "hv", "color": GREEN, "width": 2},
                                 name="best feasible so far", legendgroup="b", showlegend=r == 1,
                                 hoverinfo="skip"), row=r, col=1)
        if d.get("chosen_trial") in o["trial"]:
            i = o["trial"].index(d["chosen_trial"])
            fig.add_trace(go.Scatter(x=[d["chosen_trial"]], y=[o["value"][i] * sc], mode="markers",
                                     name="chosen", legendgroup="c", showlegend=r == 1,
                                     marker={"color": RED, "symbol": "star", "size": 15,
                                             "line": {"color": "white", "width": 1}},
                                     hovertemplate="chosen trial %{x}: %{y:.4g}<extra></extra>"),
                          row=r, col=1)
        fig.update_yaxes(title_text=o["label"], row=r, col=1)
    _layout(fig, height=260 * len(objs) + 60)
    fig.update_xaxes(title_text="trial", row=len(objs), col=1)
    return fig


def importances(d: dict):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    objs = d["objectives"]
    fig = make_subplots(rows=1, cols=len(objs), horizontal_spacing=0.25,
                        subplot_titles=[o["label"] for o in objs])
    for c, o in enumerate(objs, start=1):
        fig.add_trace(go.Bar(x=o["importance"][::-1], y=o["params"][::-1], orientation="h",
                             marker={"color": PALETTE[(c - 1) % len(PALETTE)]}, showlegend=False,
                             text=[f"{v:.2f}" for v in o["importance"][::-1]], textposition="outside",
                             cliponaxis=False,
                             hovertemplate="%{y}: %{x:.3f}<extra>" + o["label"] + "</extra>"),
                      row=1, col=c)
        top = max(o["importance"], default=0.0) or 1.0
        fig.update_xaxes(title_text="importance (sums to 1)", range=[0, top * 1.2], row=1, col=c)
    n_params = max((len(o["params"]) for o in objs), default=1)
    _layout(fig, height=max(260, 40 * n_params + 110), margin={"l": 20, "r": 20, "t": 40, "b": 50})
    fig.update_yaxes(automargin=True)
    return fig


def pareto(d: dict):
    import plotly.graph_objects as go

    xs, ys = d["x_scale"], d["y_scale"]

    def pts(p, **kw):
        return go.Scatter(x=[v * xs for v in p["x"]], y=[v * ys for v in p["y"]], text=p["text"],
                          customdata=p["trial"],
                          hovertemplate="trial %{customdata}: %{x:.4g}, %{y:.4g}<br>%{text}<extra></extra>",
                          **kw)

    fig = go.Figure()
    fig.add_trace(pts(d["feasible"], mode="markers", name="feasible trial",
                      marker={"color": BLUE, "size": 7, "opacity": 0.55}))
    groups = d.get("infeasible_groups") or ([{"label": "infeasible", **d["infeasible"]}] if d["infeasible"]["x"] else [])
    for k, g in enumerate(groups):
        fig.add_trace(pts(g, mode="markers", name=g["label"],
                          marker={"color": INFEASIBLE_COLORS[k % len(INFEASIBLE_COLORS)], "symbol": "x", "size": 7}))
    fig.add_trace(pts(d["front"], mode="lines+markers", name="Pareto front",
                      line={"color": ORANGE, "shape": "hv"}, marker={"color": ORANGE, "size": 9}))
    if d.get("chosen"):
        fig.add_trace(pts(d["chosen"], mode="markers", name="chosen",
                          marker={"color": RED, "symbol": "star", "size": 18,
                                  "line": {"color": "white", "width": 1}}))
    if d.get("cap") is not None:
        fig.add_hline(y=d["cap"] * ys, line={"color": RED, "dash": "dash", "width": 1},
                      annotation_text="quality cap", annotation_position="top right")
    _layout(fig, height=400)
    fig.update_xaxes(title_text=f"{d['x_label']}, {d['directions'][0]}")
    fig.update_yaxes(title_text=f"{d['y_label']}, {d['directions'][1]}")
    return fig


def axis_label(name: str, width: int = 12) -> str:
    """A parameter name broken into short lines (at dots and underscores) so that neighbouring
    axis labels do not run into each other."""
    parts = name.replace(".", ".\x00").replace("_", "_\x00").replace(" ", " \x00").split("\x00")
    lines, cur = [], ""
    for p in parts:
        if cur and len((cur + p).rstrip()) > width:
            lines.append(cur.rstrip())
            cur = p
        else:
            cur += p
    lines.append(cur.rstrip())
    return "<br>".join(lines)


def parallel_coordinates(d: dict):
    """One SVG line per trial over [0, 1]-scaled axes (plotly's parcoords needs WebGL)."""
    import plotly.graph_objects as go
    from plotly.colors import sample_colorscale

    axes, color = d["axes"], d["color"]
    lo, hi = min(color), max(color)
    span = hi - lo or 1.0
    xs = list(range(len(axes)))
    fig = go.Figure()
    order = sorted(range(len(d["trial"])), key=lambda i: color[i])  # best on top
    for i in order:
        trial = d["trial"][i]
        chosen = trial == d.get("chosen_trial")
        c = RED if chosen else sample_colorscale("Viridis", [(color[i] - lo) / span])[0]
        text = [f"{a['name']}: {a['raw'][i]}" for a in axes]
        fig.add_trace(go.Scatter(x=xs, y=[a["norm"][i] for a in axes], mode="lines", showlegend=chosen,
                                 name=f"chosen (trial {trial})" if chosen else f"trial {trial}",
                                 line={"color": c, "width": 4 if chosen else 1.5},
                                 opacity=1.0 if chosen else 0.7, text=text,
                                 hovertemplate=f"trial {trial}<br>" + "%{text}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
                             marker={"colorscale": "Viridis", "cmin": lo, "cmax": hi, "color": [lo],
                                     "showscale": True,
                                     "colorbar": {"title": {"text": d["color_label"]}, "thickness": 12}}))
    for x, a in zip(xs, axes):
        fig.add_shape(type="line", x0=x, x1=x, y0=0, y1=1, line={"color": "#495057", "width": 1})
        for t in a["ticks"]:
            fig.add_annotation(x=x, y=t["at"], text=t["text"], showarrow=False, xanchor="right",
                               xshift=-4, font={"size": 10, "color": "#212529"},
                               bgcolor="rgba(255,255,255,0.85)")
    # Axis names below the axes, in two staggered rows (odd axes lower), each wrapped to short
    # lines: with 15 axes side by side a name has about two axis gaps of room in its row.
    for x, a in zip(xs, axes):
        fig.add_annotation(x=x, y=0, xref="x", yref="paper", yanchor="top", yshift=-12 if x % 2 == 0 else -62,
                           text=axis_label(a["name"]), showarrow=False, name="axis-label",
                           font={"size": 10, "color": "#212529"}, align="center")
    _layout(fig, height=500, margin={"l": 40, "r": 20, "t": 40, "b": 120})
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, range=[-0.5, len(axes) - 0.5])
    fig.update_yaxes(visible=False, range=[-0.05, 1.05])
    return fig


def memory(d: dict):
    import plotly.graph_objects as go

    colors = {"non-expert weights": "#495057", "KV cache": "#1f6feb", "activation workspace": "#74c0fc",
              "safety margin": "#ffd43b", "expert cache": "#e8590c", "unused": "#dee2e6"}
    fig = go.Figure()
    for i, t in enumerate(d["terms"]):
        fig.add_trace(go.Bar(
            x=[t["value"]], y=["budget"], orientation="h", name=f"{t['label']} ({t['text']})",
            marker={"color": colors.get(t["label"], PALETTE[i % len(PALETTE)]),
                    "line": {"color": "white", "width": 1}},
            hovertemplate=f"{t['label']}: {t['text']} ({t['share']:.1%} of the budget)<extra></extra>"))
    if d.get("peak_value") is not None:
        fig.add_vline(x=d["peak_value"], line={"color": RED, "dash": "dash"},
                      annotation_text="predicted peak", annotation_position="top left")
    _layout(fig, height=240, barmode="stack", margin={"l": 70, "r": 20, "t": 60, "b": 50},
            legend={"orientation": "h", "yanchor": "top", "y": -0.45, "x": 0, "traceorder": "normal"})
    fig.update_xaxes(title_text=f"GPU memory ({d['unit']})", range=[0, d["budget_value"] * 1.02])
    return fig


def validation(d: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Bar(x=d["labels"], y=d["predicted_speed"], name="predicted", marker={"color": BLUE}))
    fig.add_trace(go.Bar(x=d["labels"], y=d["measured_speed"], name="measured", marker={"color": ORANGE},
                         text=[f"{e:+.1%}" if e is not None else "" for e in d["speed_error"]],
                         textposition="outside"))
    _layout(fig, height=320, barmode="group", bargap=0.35)
    fig.update_yaxes(title_text="decode speed (tokens/s)", rangemode="tozero")
    return fig


#: Figure name -> drawing function (build.py walks this).
FIGURES = {
    "activation_heatmap": activation_heatmap, "frequency_distribution": frequency_distribution,
    "transfer": transfer, "kernel": kernel, "predictor": predictor, "history": history,
    "importances": importances, "pareto": pareto, "parallel_coordinates": parallel_coordinates,
    "memory": memory, "validation": validation,
}
