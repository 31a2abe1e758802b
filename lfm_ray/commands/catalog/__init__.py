"""The studies of the paper, declared once: what each sweeps, its seeds and protocol. The
scripts under studies/ run them (`python studies/tau_sweep.py`), and `lfm-ray bench` times
the τ study; both import them from here."""

# In the order studies/run_all.py runs them.
STUDIES = ("tau_sweep", "alpha_sweep", "loss_comparison", "mixup_comparison",
           "imbalance_sweep", "optuna_search", "finetune_modes", "category_extrapolation",
           "similarity_sources", "text_encoder")
