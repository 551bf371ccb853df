"""The report: tables + every figure + the sweep's config + links to the manifests used.

``generate(source)`` is what ``python -m analysis <dir>`` and ``make figures`` run:
collect the run or sweep dir, save the tables, draw every figure (each skips itself
when its inputs are absent), and write ``report.md`` and a static ``report.html``
(images by relative path) into ``<dir>/report/`` unless told otherwise.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Callable

import pandas as pd

from analysis import (fig_after_diff, fig_beta_lambda, fig_edit_distance, fig_logit_shift, fig_loglik_shift,
                      fig_logp_shift, leaderboard, paired, study)
from analysis.collect import REFERENCE, collect, save_tables
from analysis.collect import flatten as flatten_config
from analysis.inference import Settings
from analysis.leaderboard import markdown

# (key, module, title, caption) in report order
FIGURES = (
    ("F1", fig_edit_distance, "Edit distance of the pairs",
     "Normalised edit distance per data source; dashed lines: bucket edges in the unit the pairing used."),
    ("F2", fig_logp_shift, "Log-prob shift over training",
     "Chosen (solid) and rejected (dashed) log-prob minus the reference on probe pairs, per bucket "
     "(Smaug's failure mode: DPO lowers the chosen response on low-edit-distance pairs)."),
    ("F3", fig_after_diff, "Chosen log-prob after the first differing token",
     "Mean per-token log-prob of chosen tokens after the first token where chosen and rejected differ "
     "(Smaug Fig. 4), held-out pairs."),
    ("F4", fig_loglik_shift, "Log-likelihood shift", "Distributions of rho(chosen) and rho(rejected) on held-out pairs."),
    ("F5", fig_logit_shift, "Logit shift", "Observed-token logit shift against the reference, chosen vs rejected; each logit relative to the mean logit of its position."),
    ("F6", leaderboard, "Leaderboard", "Headline metric per task and their average; reference row = base model."),
    ("F7", fig_beta_lambda, "Sensitivity to beta and lambda", "Scores against DPO's beta and DPOP's lambda (Smaug Fig. 3)."),
    ("S1", study, "Smaug study: DPO vs DPOP on one edit-distance bucket at a time",
     "Mean over seeds (line) and seed range (band) on the held-out probe pairs of the bucket each job trained on."),
)
Block = tuple  # ("h2"|"p"|"table"|"img"|"pre"|"links", payload)


def make_figures(tables: dict[str, pd.DataFrame], figures_dir: Path,
                 settings: Settings = Settings()) -> dict[str, list[Path]]:
    guarded = (study, fig_after_diff)  # the figures that read the after-difference log-prob
    return {key: module.make(tables, figures_dir, settings) if module in guarded else module.make(tables, figures_dir)
            for key, module, _, _ in FIGURES}


def _rel(path: str | Path, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def _jobs_rows(jobs: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = ["job", "status", "label", "seed", "overrides / differing config", "error"]
    configs = {row.job: dict(flatten_config(json.loads(row.config))) for row in jobs.itertuples() if isinstance(row.config, str)}
    keys = {k for c in configs.values() for k in c}
    skip = ("sweep_name", "artifacts_dir")
    varying = sorted(k for k in keys if not k.startswith(skip)
                     and len({json.dumps(c.get(k), default=str) for c in configs.values()}) > 1)
    body = []
    for row in jobs.itertuples():
        if row.overrides is not None and isinstance(row.overrides, str):
            overrides = row.overrides
        else:
            overrides = " ".join(f"{k.replace('/', '.')}={configs[row.job].get(k)}" for k in varying) if row.job in configs else ""
        error = "" if not isinstance(row.error, str) else (row.error[:120] + ("…" if len(row.error) > 120 else ""))
        seed = "" if pd.isna(row.seed) else str(int(row.seed))
        body.append([str(row.job), str(row.status), str(row.label), seed, overrides, error])
    return header, body


def _common_config(jobs: pd.DataFrame) -> str:
    """The configuration every job shares (keys that differ are listed per job instead)."""
    configs = [dict(flatten_config(json.loads(c))) for c in jobs["config"].dropna()]
    if not configs:
        return ""
    shared = {k: v for k, v in configs[0].items() if all(json.dumps(c.get(k), default=str) == json.dumps(v, default=str)
                                                          for c in configs)}
    return "\n".join(f"{k.replace('/', '.')}: {json.dumps(v, default=str)}" for k, v in sorted(shared.items()))


def build_blocks(tables: dict[str, pd.DataFrame], figures: dict[str, list[Path]], out_dir: Path,
                 source: Path | str, table_files: list[Path], settings: Settings = Settings()) -> list[Block]:
    jobs = tables["jobs"]
    trained = jobs[jobs["method"] != REFERENCE]
    failed = trained[trained["status"] == "failed"]
    blocks: list[Block] = [
        ("h1", "Preference-optimisation report"),
        ("p", f"Source: {source}. Jobs: {len(trained)} ({len(failed)} failed). Every number below comes from "
              "the artifacts listed at the end (no W&B, no model recomputation)."),
        ("h2", "Jobs"), ("table", _jobs_rows(jobs)),
    ]
    for name, rows in leaderboard.report_tables(tables).items():
        title = "Leaderboard (F6)" if name == "leaderboard" else "Preference metrics on held-out pairs"
        blocks += [("h2", title), ("table", rows)]
        if name == "leaderboard" and len(tables.get(paired.NAME, [])):
            blocks += paired_blocks(tables[paired.NAME], settings)
    for key, _, title, caption in FIGURES:
        images = [p for p in figures.get(key, []) if p.suffix == ".png"]
        if images:
            blocks.append(("h2", f"{key}: {title}"))
            if key == "S1":
                blocks += study_blocks(tables, settings)
            blocks += [("img", (_rel(p, out_dir), caption)) for p in images]
            others = [p for p in figures[key] if p.suffix != ".png"]
            blocks.append(("links", [(p.name, _rel(p, out_dir)) for p in others]))
    common = _common_config(jobs)
    if common:
        blocks += [("h2", "Configuration shared by every job"), ("pre", common)]
    blocks += [("h2", "Tables"), ("links", [(p.name, _rel(p, out_dir)) for p in table_files])]
    manifests = tables.get("manifests", pd.DataFrame())
    if len(manifests):
        unique = manifests.drop_duplicates("manifest_path")
        blocks += [("h2", "Manifests used"),
                   ("links", [(f"{r.stage} {r.artifact_key}", _rel(r.manifest_path, out_dir)) for r in unique.itertuples()])]
    return blocks


def paired_blocks(table: pd.DataFrame, settings: Settings = Settings()) -> list[Block]:
    """Each method against the base model on the same test items (analysis/paired.py)."""
    return [("h2", "Difference to the base model, item by item"),
            ("p", "Per test item, the method's lm-eval score minus the base model's on the same item (headline "
                  "metric of each task). Item level (one run's 0/1 scores; seeds averaged per item): items up / "
                  "down, exact McNemar p (binomial test on the items that changed; the exact sign test when seeds "
                  "are averaged) and its exact interval (Clopper-Pearson on the changed items), Holm-adjusted "
                  "across the table. Run level (what the verdict uses): each seed's score difference, 95% Student-t "
                  "interval over seeds, Holm-adjusted across the table, and the smallest difference the runs detect "
                  f"(power 0.8, alpha 0.05). Non-inferiority margin: {settings.margin_score:g}."),
            ("table", paired.markdown_rows(table))] + [("p", s) for s in paired.verdict(table, settings)]


def study_blocks(tables: dict[str, pd.DataFrame], settings: Settings = Settings()) -> list[Block]:
    """The study's table (run-level intervals, then pair and prompt level) and its verdict (analysis/study.py)."""
    table = tables["study"]  # computed once by write_report
    return [("p", "Held-out pairs of the bucket each job trained on. Run level (what the verdicts use): each seed's "
                  "mean over pairs, 95% Student-t interval over seeds, t-test p Holm-adjusted across the table, "
                  "MDE = smallest effect these runs detect (power 0.8, alpha 0.05). Beside it, labelled: 95% "
                  "intervals over pairs (each averaged over seeds) and over prompts (pairs of one prompt averaged "
                  "first); both are blind to seed variance. Quantities: after_diff_shift = mean log-prob per chosen "
                  "token after the first differing token, minus the reference, on pairs with at least "
                  f"{settings.after_diff_min_tokens} such tokens; chosen_shift / rejected_shift = summed log-prob "
                  "minus the reference (nats). Non-inferiority margins: "
                  f"{settings.margin_after_diff:g} per token, {settings.margin_nats:g} nats."),
            ("table", study.markdown_rows(table))] + [("p", sentence) for sentence in study.verdict(table, settings)]


def to_markdown(blocks: list[Block]) -> str:
    render: dict[str, Callable] = {
        "h1": lambda text: f"# {text}\n",
        "h2": lambda text: f"## {text}\n",
        "p": lambda text: f"{text}\n",
        "table": lambda rows: markdown(rows[0], [[c.replace("|", "\\|") for c in r] for r in rows[1]],
                                       numeric=rows[0][0] != "job"),
        "img": lambda item: f"![{item[1]}]({item[0]})\n\n*{item[1]}*\n",
        "pre": lambda text: f"```\n{text}\n```\n",
        "links": lambda items: "".join(f"- [{text}]({href})\n" for text, href in items),
    }
    return "\n".join(render[kind](payload) for kind, payload in blocks)


def to_html(blocks: list[Block]) -> str:
    e = html.escape

    def table(rows) -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows[1])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    render: dict[str, Callable] = {
        "h1": lambda text: f"<h1>{e(text)}</h1>",
        "h2": lambda text: f"<h2>{e(text)}</h2>",
        "p": lambda text: f"<p>{e(text)}</p>",
        "table": table,
        "img": lambda item: f'<figure><img src="{e(item[0])}" alt="{e(item[1])}"><figcaption>{e(item[1])}</figcaption></figure>',
        "pre": lambda text: f"<pre>{e(text)}</pre>",
        "links": lambda items: "<ul>" + "".join(f'<li><a href="{e(h)}">{e(t)}</a></li>' for t, h in items) + "</ul>",
    }
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
             "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}")
    body = "\n".join(render[kind](payload) for kind, payload in blocks)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Report</title><style>{style}</style>"
            f"</head><body>\n{body}\n</body></html>\n")


def write_report(tables: dict[str, pd.DataFrame], out_dir: Path | str, source: Path | str = "",
                 settings: Settings = Settings()) -> Path:
    """Tables, figures and the report for already collected ``tables``; returns the path of report.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_files = save_tables(tables, out_dir / "tables")
    tables = {**tables, paired.NAME: paired.paired_table(tables, settings)}
    if len(tables[paired.NAME]):
        tables[paired.NAME].to_csv(out_dir / "tables" / f"{paired.NAME}.csv", index=False)
        table_files.append(out_dir / "tables" / f"{paired.NAME}.csv")
    if study.applies(tables):
        tables = {**tables, "study": study.study_table(tables, settings)}
        tables["study"].to_csv(out_dir / "tables" / "study.csv", index=False)
        table_files.append(out_dir / "tables" / "study.csv")
    figures = make_figures(tables, out_dir / "figures", settings)
    blocks = build_blocks(tables, figures, out_dir, source, table_files, settings)
    (out_dir / "report.html").write_text(to_html(blocks))
    report = out_dir / "report.md"
    report.write_text(to_markdown(blocks))
    return report


def generate(source: Path | str, out_dir: Path | str | None = None, store: Path | str | None = None,
             settings: Settings = Settings()) -> Path:
    """Collect a run or sweep dir and write everything into ``out_dir`` (default ``<source>/report``);
    ``store``: the artifact store's root when it moved away from its run folders."""
    source = Path(source)
    tables = collect(source, store)
    return write_report(tables, Path(out_dir) if out_dir else source / "report", source, settings)
