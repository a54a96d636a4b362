"""What the report says about how far the chosen config's numbers hold: whether the profile's
timing was quiet enough to rank configs (tuning.json `timing_noise`), the synthetic-routing
sensitivity band (`sensitivity`), and the adaptive-k trace error (`adaptive_trace`). Data
functions return plain dicts (no plotly); `*_html` render them."""

from __future__ import annotations

import html
from typing import Any


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def checks(tuning: dict) -> list[dict]:
    """Extra deploy checks (level, text) for the summary's list."""
    out: list[dict] = []
    noise = tuning.get("timing_noise")
    if isinstance(noise, dict):
        if noise.get("noisy"):
            out.append({"level": "bad", "text": "Timing too noisy to rank configs: "
                        + "; ".join(noise.get("reasons") or []) + f" ({noise.get('criterion')}). The "
                        "predicted speeds, and which config is fastest, may change from run to run: "
                        "re-profile on a quiet machine."})
        else:
            out.append({"level": "ok", "text": f"Timing quiet enough to rank configs (not {noise.get('criterion')})."})
    band = sensitivity_data(tuning)
    if band:
        ch = band["chosen_row"]
        drop = 1.0 - ch["worst"] / ch["speeds"][0] if ch["speeds"][0] else 0.0
        out.append({"level": "warn" if drop > 0.10 else "ok",
                    "text": f"Sensitivity to routing locality (synthetic routing): the chosen config's "
                            f"predicted speed is {ch['speeds'][0]:.2f} tokens/s at the generator's preset and "
                            f"{ch['worst']:.2f} at worst over the band ({drop:.0%} lower)."})
    err = (tuning.get("adaptive_trace") or {}).get("max_count_error")
    if err is not None:
        out.append({"level": "ok" if err <= 0.02 else "warn",
                    "text": f"Replaying the exact top-k trace for adaptive-k shifts the hit/miss counts by up "
                            f"to {err:.1%} against a trace re-recorded under the finalists' thresholds."})
    return out


def sensitivity_data(tuning: dict) -> dict | None:
    s = tuning.get("sensitivity")
    if not isinstance(s, dict) or not s.get("finalists"):
        return None
    rows = s["finalists"]
    chosen = next((r for r in rows if r["trial"] == s.get("chosen")), rows[0])
    return {"settings": s["settings"], "rows": rows, "chosen": chosen["trial"], "chosen_row": chosen,
            "rule": s.get("rule"), "changed": bool(s.get("changed")), "speed_choice": s.get("speed_rule_choice")}


def sensitivity_html(tuning: dict) -> str:
    d = sensitivity_data(tuning)
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
