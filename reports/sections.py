"""The report page's sections as HTML: one function per section, each taking the loaded output
folder (reports.folder.OutputFolder, its tuning.json a `tuner.records.TuningRecord`), computing
its numbers with reports.data and drawing its figures with reports.figures (plotly is imported
only to draw). A missing optional part becomes a plain sentence."""

from __future__ import annotations

import html
from importlib import resources
from typing import Any

from tuner.records import TuningRecord

from . import data, robustness
from .folder import OutputFolder

PLOT_CONFIG = {"displaylogo": False, "responsive": True,
               "modeBarButtonsToRemove": ["select2d", "lasso2d"],
               "toImageButtonOptions": {"format": "svg"}}


# ---- html helpers -----------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def asset(name: str) -> str:
    return resources.files("reports").joinpath("assets", name).read_text(encoding="utf-8")


def _sentence(text: str | None) -> str:
    text = str(text or "")
    return text[:1].upper() + text[1:]


def _missing(text: str) -> str:
    return f'<p class="missing">{esc(text)}</p>'


def _figure(fig_id: str, title: str, fig_data: Any, caption: str, missing: str) -> str:
    """A titled figure with its 'what to look for' caption, or the missing sentence."""
    if not fig_data:
        return f"<h3>{esc(title)}</h3>" + _missing(missing)
    import plotly.io as pio

    from . import figures  # noqa: PLC0415 - plotly, only when a page is drawn

    fig = figures.FIGURES[fig_id](fig_data)
    div = pio.to_html(fig, full_html=False, include_plotlyjs=False, config=PLOT_CONFIG,
                      div_id=f"plot-{fig_id}", default_width="100%")
    return (f'<figure class="ef-figure" id="fig-{fig_id}"><h3>{esc(title)}</h3>'
            f'<div class="plot">{div}</div><figcaption>{caption}</figcaption></figure>')


def _kv_table(rows: list[dict]) -> str:
    body = "".join(f"<tr><th>{esc(r['label'])}</th><td>{esc(r['value'])}</td></tr>" for r in rows)
    return f'<table class="kv">{body}</table>'


# ---- sections ---------------------------------------------------------------------------------
def summary(run: OutputFolder, cfg: dict) -> str:
    t = run.tuning
    s = data.summary_data(t)
    chosen_pred = t.chosen.predicted
    speed = data.format_metric("decode_tokens_per_s", chosen_pred.get("decode_tokens_per_s"))
    gain = data.tuning_gain_data(t)
    head = (f"For <b>{esc(t.model.name)}</b> under a "
            f"<b>{esc(t.budget.text)}</b> GPU budget, ExpertFlow chose "
            f"trial {esc(s['chosen_trial'])}: "
            f"predicted <b>{esc(speed)}</b>"
            f" at a {esc(data.format_metric('hit_rate', chosen_pred.get('hit_rate')))} cache hit rate.")
    if gain and gain["buys_nothing"]:  # no winner to present: say so first
        head = (f'<span id="buys-nothing">{esc(gain["text"])}</span>'
                + (f" {esc(gain['stall_text'])}" if gain["stall_text"] else ""))
    checks = "".join(f'<li class="{esc(c["level"])}">{esc(c["text"])}</li>'
                     for c in data.verdict_data(t) + robustness.checks(t.timing_noise, t.sensitivity,
                                                                       t.adaptive_trace))
    cols = s["columns"]
    header = ("<tr><th>config</th>" + "".join(f'<th class="num">{esc(c["label"])}</th>' for c in cols)
              + '<th class="num">chosen vs this</th></tr>')
    body = []
    for r in s["rows"]:
        cls = r["kind"] if r["feasible"] else "infeasible"
        if not r["feasible"] and not any(v is not None for v in r["values"].values()):
            cells = f'<td colspan="{len(cols) + 1}">does not fit: {esc(r["reason"] or "infeasible")}</td>'
        else:
            cells = "".join(f'<td class="num">{esc(r["cells"][c["key"]])}</td>' for c in cols)
            ratio = r["chosen_speedup"]
            shown = "—" if r["kind"] in ("chosen", "measured") or ratio is None else f"{ratio:.2f}×"
            cells += f'<td class="num">{esc(shown)}</td>'
            if not r["feasible"]:
                cells = cells.replace("<td", f'<td title="{esc(r["reason"] or "infeasible")}"', 1)
        body.append(f'<tr class="{esc(cls)}"><td>{esc(r["name"])}</td>{cells}</tr>')
    table = (f'<div class="tablewrap"><table class="summary"><thead>{header}</thead>'
             f'<tbody>{"".join(body)}</tbody></table></div>')
    desc = data.describe_config(cfg, t.executor)
    words = ("<h3>The chosen config in plain words</h3><ul>" + "".join(f"<li>{esc(x)}</li>" for x in desc)
             + "</ul>") if desc else _missing("config.yaml is missing, so the chosen config cannot be "
                                              "described; see the parameters in tuning.json.")
    rule = f'<p class="note">Selection rule: {esc(s["rule"])}.</p>' if s.get("rule") else ""
    return (f'<section id="summary"><h2>Summary</h2><p class="headline">{head}</p>'
            f'<ul class="checks">{checks}</ul>{table}'
            '<p class="note">Every row comes from the same simulator, profile and routing trace. '
            '"chosen vs this" = the chosen config\'s predicted decode speed ÷ that row\'s '
            '(above 1× = the chosen config is faster).</p>'
            f"{rule}{robustness.sensitivity_html(t.sensitivity)}{words}</section>")


def environment(run: OutputFolder) -> str:
    e = data.environment_data(run.tuning, run.profile)
    notes = "".join(f'<p class="banner info">{esc(n)}</p>' for n in e["notices"][1 if e["synthetic"] else 0:])
    return (f'<section id="environment"><h2>Hardware and environment</h2>{notes}'
            f'{_kv_table(e["rows"])}</section>')


def profile(run: OutputFolder, cfg: dict) -> str:
    p, t = run.profile, run.tuning
    if p is None:
        return f'<section id="profile"><h2>Profile</h2>{_missing(run.profile_note or "no profile")}</section>'
    E = int(t.model.num_experts or p.trace.num_experts)
    heat = data.activation_heatmap_data(p)
    slots = data.slots_per_layer(cfg)
    freq = data.frequency_distribution_data(p, slots)
    bpe = t.model.bytes_per_expert or p.meta.model.bytes_per_expert
    tr = data.transfer_data(p, bpe)
    kern = data.kernel_data(p)
    pred = data.predictor_data(p)
    depth = ((cfg or {}).get("prefetch") or {}).get("depth")
    engine = t.executor == "graph"
    parts = ["<section id=\"profile\"><h2>Profile</h2>",
             f'<p>Routing of {esc(p.trace.num_tokens)} tokens ({esc(p.routing_kind)}), profile '
             f'<code>{esc(p.profile_id)}</code>.</p>']
    parts.append(_figure(
        "activation_heatmap", "Expert activation by layer", heat,
        "<b>What to look for:</b> each row is a MoE layer, each column an expert; darker means used "
        f"more (uniform routing would be {heat['uniform_percent']:.1f} % everywhere). A few dark "
        "columns per row mean a small cache catches most tokens; an even row means every expert "
        "is needed and the hit rate will follow the cache's share." if heat else "",
        "The profile has no activation table."))
    if freq:
        need = freq["experts_needed_median"]
        static = (f" At the chosen cache's {slots:.1f} slots per layer (orange line), a static cache of "
                  f"the hottest experts would hit about {freq['static_hit_percent']:.0f} % of the time."
                  if freq.get("static_hit_percent") is not None else "")
        cap = (f"<b>What to look for:</b> how few experts carry most of the traffic. Per layer "
               f"(median), {need['50']:.0f} of {E} experts carry half of the activations, "
               f"{need['80']:.0f} carry 80 % and {need['95']:.0f} carry 95 %. The further the curves "
               f"bow above the dotted diagonal, the more a small cache helps.{static}")
    else:
        cap = ""
    parts.append(_figure("frequency_distribution", "Activation frequency distribution", freq, cap,
                         "The profile has no activation table."))
    cap = ("<b>What to look for:</b> the copy time of one expert is the price of every cache miss"
           + (" (the graph engine reads a miss from pinned memory inside its step at about this rate, "
              "and copies misses in prefill). " if engine else ". "))
    if tr and tr.get("expert") and tr["expert"].get("copy_ms"):
        x = tr["expert"]
        cap += (f"Here one expert ({x['mib']:.3g} MiB) takes {x['copy_ms']:.3g} ms pinned "
                f"(≈ {x['gbps']:.1f} GB/s). ")
    cap += ("Pinned host memory should be several times faster than pageable; small copies are "
            "latency-bound, so bandwidth rises with size.")
    parts.append(_figure("transfer", "Host→GPU transfer latency and bandwidth vs size", tr, cap,
                         "The profile has no transfer table."))
    parts.append(_figure(
        "kernel", "Expert kernel time vs tokens", kern,
        "<b>What to look for:</b> at decode batch sizes an expert's FFN is launch-bound, so its time "
        "barely grows with tokens. "
        + ("On the graph engine these tables price prefill; a decode step is charged the engine's own "
           "measurements (the captured step, and its experts kernel with each hit and miss). " if engine else
           "When one expert's copy (above) takes longer than a layer's compute, prefetch can only partly "
           "hide it. ")
        + f"Timing source: {esc((kern or {}).get('timing_kind'))}.",
        "The profile has no kernel table."))
    parts.append(_figure(
        "predictor", "Predictor accuracy vs lookahead", pred,
        "<b>What to look for:</b> the share of needed experts the next-gate predictor guesses "
        "d layers ahead. "
        + ("The graph engine does not prefetch (its misses are read inside the step), so this is "
           "what a predictor could add, not what the config uses." if engine else
           "Prefetching deeper hides more copy time but fetches more wrong experts"
           + (f"; the tuner chose depth {esc(depth)}." if depth is not None else ".")),
        "The profile has no predictor table (the trace recorded no lookahead), so prefetch accuracy "
        "is not shown."))
    parts.append("</section>")
    return "".join(parts)


def study(run: OutputFolder) -> str:
    t = run.tuning
    st = t.study
    hist = data.history_data(t, run.trials, run.study)
    n_inf = hist["n_infeasible"] if hist else 0
    objectives = ", ".join(f"{o} ({d})" for o, d in zip(st.objectives, st.directions))
    by_label = (hist or {}).get("infeasible_by_label") or {}
    inf_words = f"{n_inf} infeasible" + (": " + ", ".join(f"{n} {k.removeprefix('infeasible: ')}"
                                                          for k, n in sorted(by_label.items())) if by_label else "")
    intro = (f"<p>Study <code>{esc(st.name)}</code> in <code>{esc(st.storage)}</code>: "
             f"{len(run.trials)} completed trials ({esc(inf_words)}), objectives "
             f"{esc(objectives)}, "
             f"seed {esc(st.seed)}.</p>")
    if run.study_note:
        intro += f'<p class="banner info">{esc(run.study_note)}</p>'
    parts = ['<section id="study"><h2>Study</h2>', intro]
    parts.append(_figure(
        "history", "Optimisation history", hist,
        "<b>What to look for:</b> each dot is a trial, the green line the best feasible value so far "
        f"({esc(_directions_text(hist))}). "
        "A line still improving at the end says more trials would likely pay off (ef-tune --resume "
        "--trials N). Crosses are infeasible trials, labelled by the constraint they broke (the "
        "memory budget or the quality cap); they never count in the green line.",
        "No completed trials could be read from the study."))
    imp = data.importance_data(t, run.study)
    parts.append(_figure(
        "importances", "Parameter importances", imp if imp and imp["objectives"] else None,
        "<b>What to look for:</b> which knobs moved each objective; a knob near zero hardly matters "
        f"within its searched range. {esc(_sentence((imp or {}).get('note')))}",
        (imp or {}).get("note") or "No study to compute importances from."))
    par = data.pareto_data(t, run.trials, run.study)
    parts.append(_figure(
        "pareto", "Pareto front", par,
        "<b>What to look for:</b> the trade-off between speed and quality loss. Orange: trials no other "
        "feasible trial beats on both objectives; red star: the chosen config; dashed line: the "
        "quality cap. Crosses are infeasible trials, labelled in the legend by the constraint they "
        "broke.",
        "Single-objective study: there is no trade-off front to show (the history above has the "
        "whole search)."))
    pc = data.parallel_coordinates_data(t, run.trials)
    parts.append(_figure(
        "parallel_coordinates", "Parallel coordinates", pc,
        "<b>What to look for:</b> each line is a feasible trial across the searched knobs and the "
        "objectives (each axis spans the values seen; colour = decode speed, yellow is fastest). "
        "Bundles of yellow lines show where fast configs live; the red line is the chosen config.",
        "Fewer than two feasible trials: nothing to compare across parameters."))
    mem = data.memory_data(t)
    cap = ("<b>What to look for:</b> where the budget goes. The expert cache is what remains after "
           "the fixed terms")
    if mem and mem.get("capacity_experts") is not None:
        cap += (f": {esc(mem['capacity_experts'])} of {esc(mem['total_experts'])} experts fit. "
                "The dashed line is the chosen config's predicted peak.")
    parts.append(_figure("memory", "Memory budget accounting", mem, cap + ("" if cap.endswith(".") else "."),
                         "tuning.json has no budget terms."))
    parts.append(_quality(t))
    parts.append("</section>")
    return "".join(parts)


def _directions_text(hist: dict | None) -> str:
    if not hist:
        return ""
    return "; ".join(f"{o['label']}: {'higher' if o['direction'] == 'maximize' else 'lower'} is better"
                     for o in hist["objectives"])


def _quality(t: TuningRecord) -> str:
    q = data.quality_data(t)
    if not q:
        metric = t.quality.metric.replace("_", " ")
        return ("<h3>Quality of adaptive-k</h3>" +
                _missing(f"No measured quality table in tuning.json (it needs trained weights): quality "
                         f"loss is the {metric} per token the simulator estimates."))
    head = "".join(f'<th class="num">{esc(h)}</th>' for h in q["headings"])
    rows = "".join("<tr>" + "".join(f'<td class="num">{esc(r["cells"][c])}</td>' for c in q["columns"])
                   + "</tr>" for r in q["rows"])
    cap = f"cap {q['cap']:.2%}" if q["cap"] is not None else "no cap set"
    return (f"<h3>Quality of adaptive-k</h3><p>Measured per adaptive-k threshold "
            f"(quality metric: {esc(q['metric'])}, {esc(cap)}). Lower thresholds skip more experts.</p>"
            f'<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')


def validation(run: OutputFolder) -> str:
    v = data.validation_data(run.tuning)
    if not v:
        note = run.tuning.validation_note or "no validation ran"
        return ('<section id="validation"><h2>Validation</h2>'
                + _missing(f"Not validated ({note}): every number in this report is a simulator "
                           "prediction. Run ef-tune on the target GPU to measure them.") + "</section>")
    fig = _figure("validation", "Predicted vs measured decode speed", v if v["labels"] else None,
                  "<b>What to look for:</b> the label on each measured bar is its error against the "
                  f"prediction; within ±{data.VALIDATION_OK_ERROR:.0%} the simulator's ranking of "
                  "configs can be trusted.", "No decode speed was measured.")
    rows = "".join(
        f"<tr><td>{esc(r['label'])}</td><td>{esc(r['metric_label'])}</td>"
        f'<td class="num">{esc(r["predicted_text"])}</td><td class="num">{esc(r["measured_text"])}</td>'
        f'<td class="num">{"—" if r["error"] is None else format(r["error"], "+.1%")}</td></tr>'
        for r in v["rows"])
    table = ("<table><thead><tr><th>config</th><th>metric</th><th class=\"num\">predicted</th>"
             "<th class=\"num\">measured</th><th class=\"num\">error (measured vs predicted)</th></tr>"
             f"</thead><tbody>{rows}</tbody></table>")
    note = f'<p class="note">{esc(v["note"])}.</p>' if v.get("note") else ""
    return f'<section id="validation"><h2>Validation</h2>{note}{fig}{table}</section>'


def config(run: OutputFolder) -> str:
    c = data.config_data(run.tuning, run.config_text, run.path)
    cmd = (f'<div class="copyrow"><h3>Run it</h3><button class="copy" type="button" '
           f'data-target="run-command">Copy command</button></div>'
           f'<pre id="run-command">{esc(c["run_command"])}</pre>')
    if c["yaml"]:
        yml = (f'<div class="copyrow"><h3>config.yaml</h3><button class="copy" type="button" '
               f'data-target="config-yaml">Copy YAML</button></div>'
               f'<pre class="yaml" id="config-yaml">{esc(c["yaml"])}</pre>')
    else:
        yml = _missing(f"config.yaml is missing from {run.path}; re-run ef-tune --resume to write it.")
    return f'<section id="config"><h2>Config</h2>{cmd}{yml}</section>'
