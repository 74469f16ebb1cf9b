"""Writing a report's files: report.html, report.md, pareto.csv and the PNG plots."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna

from search.errors import UserError
from search.report import html as report_html
from search.report.atomic import write_atomically
from search.report import plots as report_plots
from search.report.text import csv_frame, markdown
from search.report.view import StudyView, read_study
from search.study.spec import check_study_name


@dataclass(frozen=True)
class ReportPaths:
    """Files written by write_report."""

    out_dir: Path
    html: Path
    markdown: Path
    csv: Path
    pngs: tuple[Path, ...]


def report_dir(results_dir: str | Path, study_name: str, profile: str | None = None) -> Path:
    """Where a study's report goes: RESULTS_DIR/STUDY/, or RESULTS_DIR/STUDY/on-P/ for a report
    re-priced for profile P. UserError when the study name (typed, or read from storage) or the
    profile's name is not one safe folder name (search.study.spec.check_study_name), so no
    name writes outside the results directory."""
    out = Path(results_dir) / check_study_name(study_name)
    if profile is not None:
        out = out / check_study_name(f"on-{Path(profile).stem}", "--profile")
    return out


def write_report(study: optuna.Study, out_dir: str | Path, profile: str | None = None) -> ReportPaths:
    """Write report.html, report.md, pareto.csv and the PNG plots of `study` under `out_dir`."""
    return write_view(read_study(study, profile), out_dir)


def write_view(view: StudyView, out_dir: str | Path) -> ReportPaths:
    """Write the report files of an already read study view under `out_dir`. UserError, before
    anything is written, for a study whose stored name is not a safe folder name: reports are
    filed under RESULTS_DIR/NAME/ (report_dir), so such a name is refused wherever it comes from."""
    check_study_name(view.name, "study")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create report directory {str(out)!r} ({e.strerror}); pass a writable --results-dir") from None
    csv, md, html = out / "pareto.csv", out / "report.md", out / "report.html"
    # each file whole or not at all: another process may write the same report at the same time
    write_atomically(csv, lambda p: csv_frame(view).to_csv(p, index=False))
    text = markdown(view)
    write_atomically(md, lambda p: p.write_text(text))
    page = report_html.render(view)
    write_atomically(html, lambda p: p.write_text(page, encoding="utf-8"))
    pngs = report_plots.write_all(view, out)
    return ReportPaths(out, html, md, csv, tuple(pngs))
