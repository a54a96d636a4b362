"""What the report says about how far the chosen config's numbers hold: whether the profile's
timing was quiet enough to rank configs (tuning.json `timing_noise`), the synthetic-routing
sensitivity band (`sensitivity`), and the adaptive-k trace error (`adaptive_trace`). Each
function takes the part of the `tuner.records.TuningRecord` it reads (None when tuning.json has
none). Data functions return plain dicts (no plotly); `*_html` render them."""

from __future__ import annotations

import html
from typing import Any

from tuner.records import AdaptiveTraceCheck, Sensitivity, TimingNoise


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def checks(timing_noise: TimingNoise | None = None, sensitivity: Sensitivity | None = None,
           adaptive_trace: AdaptiveTraceCheck | None = None) -> list[dict]:
    """Extra deploy checks (level, text) for the summary's list, from the record's parts."""
    out: list[dict] = []
    if timing_noise is not None:
        if timing_noise.noisy:
            out.append({"level": "bad", "text": "Timing too noisy to rank configs: "
                        + "; ".join(timing_noise.reasons) + f" ({timing_noise.criterion}). The "
                        "predicted speeds, and which config is fastest, may change from run to run: "
                        "re-profile on a quiet machine."})
        else:
            out.append({"level": "ok",
                        "text": f"Timing quiet enough to rank configs (not {timing_noise.criterion})."})
    band = sensitivity_data(sensitivity)
    if band:
        ch = band["chosen_row"]
        drop = 1.0 - ch["worst"] / ch["speeds"][0] if ch["speeds"][0] else 0.0
        out.append({"level": "warn" if drop > 0.10 else "ok",
                    "text": f"Sensitivity to routing locality (synthetic routing): the chosen config's "
                            f"predicted speed is {ch['speeds'][0]:.2f} tokens/s at the generator's preset and "
                            f"{ch['worst']:.2f} at worst over the band ({drop:.0%} lower)."})
    if adaptive_trace is not None:
        err = adaptive_trace.max_count_error
        out.append({"level": "ok" if err <= 0.02 else "warn",
                    "text": f"Replaying the exact top-k trace for adaptive-k shifts the hit/miss counts by up "
                            f"to {err:.1%} against a trace re-recorded under the finalists' thresholds."})
    return out


def sensitivity_data(s: Sensitivity | None) -> dict | None:
    if s is None or not s.finalists:
        return None
    chosen = next((r for r in s.finalists if r.trial == s.chosen), s.finalists[0])
    return {"settings": [b.model_dump() for b in s.settings], "rows": [r.model_dump() for r in s.finalists],
            "chosen": chosen.trial, "chosen_row": chosen.model_dump(), "rule": s.rule, "changed": s.changed,
            "speed_choice": s.speed_rule_choice}


def sensitivity_html(s: Sensitivity | None) -> str:
    d = sensitivity_data(s)
    if not d:
        return ""
    head = "".join(f'<th class="num">{_esc(b["label"])}<br>LRU hit at 25%: {b["lru_hit_25"]:.2f}</th>'
                   for b in d["settings"])
    body = "".join(
        f'<tr class="{"chosen" if r["trial"] == d["chosen"] else ""}"><td>trial {_esc(r["trial"])}</td>'
        + "".join(f'<td class="num">{v:.2f}</td>' for v in r["speeds"])
        + f'<td class="num"><b>{r["worst"]:.2f}</b></td></tr>' for r in d["rows"])
    changed = (f" It chose trial {_esc(d['chosen'])} over trial {_esc(d['speed_choice'])}, the faster one at the "
               "preset, because its worst case is higher." if d["changed"] else "")
    return ('<h3 id="sensitivity">Sensitivity to routing locality</h3>'
            "<p>Routing is synthetic, so the real model's locality is unknown. The finalists were "
            "re-simulated on traces of the same generator with only its locality moved (what each "
            "setting means is its LRU hit rate at 25% capacity). Predicted decode tokens/s:</p>"
            f'<div class="tablewrap"><table class="summary"><thead><tr><th>finalist</th>{head}'
            f'<th class="num">worst</th></tr></thead><tbody>{body}</tbody></table></div>'
            f'<p class="note">Rule: {_esc(d["rule"])}.{changed}</p>')
