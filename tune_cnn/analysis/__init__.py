"""Read a sweep's experiment folder into a Sweep (a tidy DataFrame and its context) and turn it into tables,
findings, plots and a report.

    python -m tune_cnn.analysis EXPERIMENT [--by SETTING ...] [--epochs 10 20 30] [--out DIR]

    sweep = analysis.load("tune_results/seed")
    analysis.summarize(sweep, by="pooling")

The stages, one module each: load (folder -> Sweep), stats (summaries, diagnosis, effects, importance), questions
(the learner's: why the loss rises, longer training, grokking, cost), plots, report (sentences, report.md and the
analysis folder), and __main__ (the command).
"""
from tune_cnn.analysis.load import LOST, AnalysisError, ExperimentContext, Sweep, load
from tune_cnn.analysis.plots import (
    plot_cost,
    plot_effects,
    plot_grouped,
    plot_learning_curves,
    plot_reliability,
    plot_right_and_wrong,
    plot_workers,
    prepare_plotting,
)
from tune_cnn.analysis.questions import late_rise, late_trend, learner_findings, loss_rise, trial_costs
from tune_cnn.analysis.report import analyse_into, best_trials, findings, report_markdown, write_analysis
from tune_cnn.analysis.stats import diagnose, effects, importance, select_rows, summarize, t_critical, trial_values
from tune_cnn.experiment import METRICS

__all__ = [
    "LOST", "METRICS", "AnalysisError", "ExperimentContext", "Sweep", "analyse_into", "best_trials", "diagnose", "effects", "findings",
    "importance", "late_rise", "late_trend", "learner_findings", "load", "loss_rise", "plot_cost", "plot_effects", "plot_grouped",
    "plot_learning_curves", "plot_reliability", "plot_right_and_wrong", "plot_workers", "prepare_plotting", "report_markdown", "select_rows",
    "summarize", "t_critical", "trial_costs", "trial_values", "write_analysis",
]
