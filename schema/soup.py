"""Result tables of the ``soup`` probe (see lsdb.probes.soup for the exact maths)."""

from __future__ import annotations

from sqlalchemy import Boolean, Double, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base, Metric, ProbeRow


def _f(nullable: bool = False):
    return mapped_column(Double, nullable=nullable)


class SoupResult(ProbeRow, Base):
    """The weight average of k networks against its members and their ensemble, one row per group
    (role "spawn_children", "late_children", "cross_init" or "set"), all measured on the report half
    of the test split (``n_report`` examples; the other ``n_select`` choose the best member and the
    greedy soup).

    ``members_mean_*``: the members' mean; ``best_member_*``: the member with the lowest selection
    error; ``uniform_*``: (1/k)Σw_i; ``greedy_*``: Wortsman et al.'s greedy soup of ``greedy_size``
    members; ``ensemble_*``: the members' mean logits; ``matched_uniform_*``: the average after
    aligning every member to the first by weight matching (cross_init groups of plain models, else
    null); ``mean_distance_to_average`` = (1/k)Σ‖w_i − w̄‖₂.
    """

    __tablename__ = "soup"
    __table_args__ = {"info": {"metrics": [
        Metric("children_soup_test_loss", "uniform_test_loss", role="spawn_children"),
        Metric("children_soup_test_error", "uniform_test_error", role="spawn_children"),
        Metric("children_members_test_loss", "members_mean_test_loss", role="spawn_children"),
        Metric("children_ensemble_test_error", "ensemble_test_error", role="spawn_children"),
        Metric("cross_init_soup_test_loss", "uniform_test_loss", role="cross_init"),
        Metric("cross_init_members_test_loss", "members_mean_test_loss", role="cross_init"),
        Metric("cross_init_matched_soup_test_loss", "matched_uniform_test_loss", role="cross_init"),
    ]}}
    k: Mapped[int] = mapped_column(Integer)
    n_select: Mapped[int] = mapped_column(Integer)
    n_report: Mapped[int] = mapped_column(Integer)
    members_mean_test_loss: Mapped[float] = _f()
    members_mean_test_error: Mapped[float] = _f()
    best_member_test_loss: Mapped[float] = _f()
    best_member_test_error: Mapped[float] = _f()
    uniform_test_loss: Mapped[float] = _f()
    uniform_test_error: Mapped[float] = _f()
    greedy_size: Mapped[int] = mapped_column(Integer)
    greedy_test_loss: Mapped[float] = _f()
    greedy_test_error: Mapped[float] = _f()
    ensemble_test_loss: Mapped[float] = _f()
    ensemble_test_error: Mapped[float] = _f()
    mean_distance_to_average: Mapped[float] = _f()
    matched_uniform_test_loss: Mapped[float | None] = _f(nullable=True)
    matched_uniform_test_error: Mapped[float | None] = _f(nullable=True)


class SoupMemberResult(ProbeRow, Base):
    """One member of a soup group: its report-half test loss and error, its selection error, and
    whether the greedy soup kept it."""

    __tablename__ = "soup_member"
    member: Mapped[int] = mapped_column(Integer)
    member_checkpoint_id: Mapped[str] = mapped_column(String, info={"references": "checkpoint.id"})
    test_loss: Mapped[float] = _f()
    test_error: Mapped[float] = _f()
    select_error: Mapped[float] = _f()
    in_greedy_soup: Mapped[bool] = mapped_column(Boolean)
