"""Read a sweep's experiment folder into a Sweep (a tidy DataFrame and its context) and turn it into tables,
findings, plots and a report.

    python -m tune_cnn.analysis EXPERIMENT [--by SETTING ...] [--epochs 10 20 30] [--out DIR]

    sweep = analysis.load("tune_results/seed")
    analysis.summarize(sweep, by="pooling")

The stages, one module each: load (folder -> Sweep), stats (summaries, diagnosis, effects, importance), plots,
report (sentences, report.md and the analysis folder), and __main__ (the command).
"""
from tune_cnn.analysis.load import LOST, AnalysisError, ExperimentContext, Sweep, load
from tune_cnn.analysis.plots import plot_effects, plot_grouped, plot_learning_curves, plot_workers, prepare_plotting
from tune_cnn.analysis.report import analyse_into, best_trials, findings, report_markdown, write_analysis
from tune_cnn.analysis.stats import diagnose, effects, importance, select_rows, summarize, t_critical, trial_values
from tune_cnn.experiment import METRICS

__all__ = [
    "LOST", "METRICS", "AnalysisError", "ExperimentContext", "Sweep", "analyse_into", "best_trials", "diagnose", "effects", "findings",
    "importance", "load", "plot_effects", "plot_grouped", "plot_learning_curves", "plot_workers", "prepare_plotting", "report_markdown",
    "select_rows", "summarize", "t_critical", "trial_values", "write_analysis",
]
