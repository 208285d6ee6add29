"""Every named threshold and fixed choice of the query layer, in one place.

These are decisions made before looking at any data (see docs/findings.md).
A finding that fails on the data at hand is reported as failing: never tune a value here to
make a store pass. Errors are stored as fractions in [0, 1], so one percentage point is 0.01.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------- time axis
#: Offset (epochs) added before taking logs of time, so that epoch 0 has a finite log-time.
#: Used by correlate's alignment, transition fits and log-scaled chart axes. [ours]
LOG_TIME_OFFSET = 0.01

#: One percentage point of error.
POINT = 0.01

# ------------------------------------------------------------------------- shared rules
#: A measure "falls" with time when its Spearman correlation with time is at most this. [ours]
FALLS_SPEARMAN_MAX = -0.5
#: Fewest distinct times needed to compute a rank correlation against time. [ours]
MIN_TIMES = 3
#: A per-seed yes/no test holds for the finding when at least this fraction of seeds passes. [ours]
SEED_MAJORITY = 0.5
#: z-value of a two-sided 95% interval.
Z95 = 1.959963984540054

# ------------------------------------------------------------------------- uncertainty
# A verdict is "inconclusive" when the seeds' spread (mean ± std) or a bootstrap interval of the seed
# mean straddles the threshold, when fewer than MIN_SEEDS seeds were measured, or when a stated
# precondition fails (F11 matched accuracy, F12 matched train loss, F13 at a minimum, F14 path grid).
#: Fewest seeds (parent runs; for F14's cross-init part, anchor runs) a verdict rests on. [ours]
MIN_SEEDS = 2
#: Percentile bootstrap of the seed mean: level, resamples and the seed of its generator (so the
#: same store always prints the same interval). [ours]
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
#: Fewest α points on an interpolation path (barriers): the design notes ask for a grid of ≥ 21. [ours]
PATH_POINTS_MIN = 21
#: "At a minimum" (F13): the train loss fell by at most CONVERGED_LOSS_DROP_MAX (relative) from the latest
#: checkpoint at or before t/T = 1 − CONVERGED_WINDOW_FRAC to the final one. [ours]
CONVERGED_WINDOW_FRAC = 0.1
CONVERGED_LOSS_DROP_MAX = 0.05

# --------------------------------------------------------------- F1 basin fixed early
F1_SPEARMAN_MAX = -0.6          # barrier vs spawn time
F1_ERROR_BARRIER_MAX = 2 * POINT  # onset: error barrier below 2 points ...
F1_LOSS_BARRIER_MAX = 0.05        # ... and loss barrier below 0.05
F1_ONSET_FRAC_MAX = 0.25          # onset within the first quarter of training

# ------------------------------------------------------------ F2 measures correlated
F2_PAIR_SPEARMAN_MIN = 0.6      # pairwise Spearman between measures over spawn times
F2_PAIR_FRACTION_MIN = 0.8      # ... for at least this fraction of pairs
F2_MIN_MEASURES = 3             # fewer measured quantities than this: not measured

# ------------------------------------------------------ F3 kernel velocity fast, then flat
F3_EARLY_FRAC = 0.05            # "early" = the first 5% of training (2 epochs of 40)
F3_LATE_FRAC = 0.5              # "late" = the last half of training
F3_RATIO_MIN = 3.0              # early median velocity / late median velocity
F3_PLATEAU_MAXMIN = 3.0         # smoothed max / min over the late plateau
F3_SMOOTH_WINDOW = 3            # centred rolling median width for the plateau test
F3_FROZEN_FRAC = 0.01           # late median below 1% of the early one: a frozen kernel, not "holds"
#: The velocity that decides: the angular velocity θ/Δ = arccos(1 − S)/Δ, which does not depend on the
#: spacing Δ for steady motion (S/Δ grows like Δ there); S/Δ is reported next to it, and decides only
#: when no angular velocity is stored. [ours]
F3_DECIDING_METRIC = "kernel_angular_velocity"

# ----------------------------------------------------------- F4 kernel moves mostly early
F4_EARLY_FRAC = 0.1
F4_RATIO_MIN = 0.5              # S(Θ_0, Θ_0.1T) / S(Θ_0, Θ_T)

# ------------------------------------------------------ F5 learned NTK beats initial NTK
F5_RATIO_MIN = 1.5              # err_lin(t=0) / err_lin(onset or 10%)
F5_DEFAULT_FRAC = 0.1           # comparison time when F1's onset is not measured

# ------------------------------------------------------- F6 linearised model catches up
F6_TOL_POINTS = 1 * POINT       # err_lin(t) <= err_full(T) + max(1 point, 25%)
F6_TOL_RELATIVE = 0.25
F6_FRAC_MAX = 0.5
# The expansion at the parent's final checkpoint is left out (F5, F6): there the linearised model of a
# child "trained to the end" trains 0 steps and equals the network, so it always catches up.

# --------------------------------------------------- F7 nonlinear advantage vanishes early
F7_ADVANTAGE_MAX = 1 * POINT
F7_FRAC_MAX = 0.25

# ----------------------------------------------------- F8 disagreement falls with spawn
F8_RATIO_MAX = 0.5              # disagreement(latest spawn) / disagreement(earliest spawn)

# ---------------------------------------------------------------- F9 ~C Hessian outliers
F9_BELOW = 2                    # outliers in [C - 2, C + 1]
F9_ABOVE = 1

# ------------------------------------------------------------------ F10 edge of stability
# The stability threshold at learning rate η is 2/η for GD/SGD and 2(1 + β)/η for heavy-ball momentum β
# (Cohen et al. 2021, from the linear stability of heavy ball on a quadratic; 38 at η = 0.1, β = 0.9)
# [paper]; weight decay wd adds wd to every curvature of the regularised loss, so the rule compares
# curvature + wd. The curvature: λ_max for full-batch runs [paper]; batch sharpness E_B[g_BᵀH_Bg_B/‖g_B‖²]
# for mini-batch runs (the "edge of stochastic stability" follow-up to Cohen et al.) [recalled].
#: Hovering at the threshold: the median of (curvature + wd) / threshold over the settled window lies in
#: [F10_EDGE_LOW, F10_EDGE_HIGH]. Cohen et al. show λ_max oscillating around, mostly just above, 2/η;
#: the ±20% band is ours. [ours]
F10_EDGE_LOW = 0.8
F10_EDGE_HIGH = 1.2
#: The settled window of a constant-learning-rate phase: its second half (the curvature needs time to rise
#: to a new threshold after a drop). The longest phase with ≥ MIN_TIMES checkpoints in its window decides;
#: the others are reported. [ours]
F10_SETTLED_FRAC = 0.5
#: λ_max "rises then falls" (reported beside the verdict, Fort & Ganguli 2019): its peak strictly inside,
#: rising from the first value and falling to the last by at least this fraction of the peak each. [ours]
F10_CHANGE_MIN = 0.1

# ---------------------------------------------------- F15 gradient in the top-C eigenspace
#: "After the first few percent of training" (Gur-Ari et al. 2018): checkpoints at t/T ≥ this. [ours]
F15_AFTER_FRAC = 0.05
#: ‖P_top-C g‖ / ‖g‖, the median over those checkpoints per seed, at least this. [ours]
F15_FRACTION_MIN = 0.8

# ------------------------------------------------ F11 adversarial training is not flatter
F11_RATIO_MIN = 0.9             # σ_1D(adversarial) / σ_1D(standard)
F11_MATCH_ERROR = 5 * POINT     # clean test errors within 5 points count as "matched"

# ------------------------------------------------------- F12 large batch is sharper
F12_RATIO_MIN = 1.2
#: The sharpness that decides: worst-case sharpness in the filter-normalised ball (Keskar et al.'s measure
#: under Li et al.'s normalisation). σ_1D averages the loss rise over α ∈ [−1, 1], perturbations as large
#: as the weights, where the loss saturates; it is reported with κ, λ₁ and the Hessian trace. [ours]
F12_DECIDING_METRIC = "adversarial_sharpness"
#: Train losses "matched" when within this factor of each other (large batch vs the small-batch
#: checkpoint, among those with the measure, nearest in train loss). [ours]
F12_LOSS_MATCH_FACTOR = 1.5

# ------------------------------------------------ F13 more patches, smaller top eigenvalue
F13_RATIO_MAX = 0.7             # λ(most patches) / λ(fewest patches)

# ------------------------------------------------------------------------ F14 merging
F14_AVERAGE_LOSS_MAX = 0.05     # loss barrier between late children (averaging is harmless)
F14_NAIVE_BARRIER_MIN = 0.1     # a "clear" naive loss barrier between different inits
F14_MATCHED_RATIO_MAX = 0.5     # weight matching at least halves it

# ---------------------------------------------------- F16–F19 merging (Khan et al. 2024's four aspects)
F16_SOUP_EXCESS_MAX = 0.05      # soup test loss − members' mean at the latest spawn (as F14's barrier) [ours]
F17_LATE_RATIO_MAX = 0.5        # late children's disagreement / different seeds' [ours]
F17_EARLY_RATIO_MIN = 0.5       # early children's disagreement / different seeds' [ours]
F17_EARLY_FRAC_MAX = 0.05       # an "early" spawn: at most 5% of training [ours]
F18_COSINE_MAX = 0.2           # "near-orthogonal" task vectors: |cos| at most this [ours]
F18_GAIN_KEPT_MIN = 0.5         # Σ τ keeps ≥ half the fine-tunes' mean task-error reduction [ours]
F19_MIN_WIDTHS = 3              # widths a trend with width rests on (as MIN_TIMES) [ours]

# ------------------------------------------------------------------------- transition
TRANSITION_MIN_SEGMENT = 3      # each segment of the transition fit spans >= 3 samples
CHI2_1_95 = 3.841458820694124   # 95% quantile of chi-square with 1 degree of freedom
