"""A review session over the queue of `bimedix.llm.review`, decision by decision (what ``review serve`` runs
on).

The queue is the one ``review export`` writes (or the rows of a given queue file); an *item* is one record
with all its queued texts. Every decision is appended to the audit trail (``OUT.audit.jsonl``, the file
``review import`` appends to) and flushed to disk before it is acknowledged, so a killed process loses
nothing decided; on start the trail is read back and the latest decision on each text wins, earlier ones
(another reviewer's) staying in the trail. The reviewed records are written to ``OUT`` (`write_output`, and
on start after an earlier run) with `apply_decisions`, the code ``review import`` uses, so the result is
the one ``review import`` gives for the same decisions. Each item has a `version` (its decision entries so
far); a decision naming an older one is refused (`StaleDecision`), so nobody reverts a decision unseen. The
output and the audit trail are checked against the inputs by `bimedix.core.outputs.check_outputs`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..core.io import write_jsonl
from ..core.outputs import check_outputs
from ..data.mcqa import LETTERS
from ..data.schema import read_records
from .invariants import check_invariants, protected_terms
from .review import (
    append_audit,
    apply_decisions,
    audit_entry,
    queue_rows,
    read_audit,
    read_review_rows,
    row_problem,
    text_of,
)
from .review_stats import review_agreement

logger = logging.getLogger(__name__)

ACTIONS = ("approve", "edit", "reject")
STATES = ("undecided", "approved", "edited", "rejected")


class StaleDecision(ValueError):
    """A decision made on an older version of an item than the current one (another reviewer decided it
    since)."""


@dataclass
class ReviewItem:
    """One queued record: its id and the fields under review, in queue order."""

    id: str
    fields: list[str] = field(default_factory=list)


class ReviewSession:
    """The review queue of ``translated`` with the decisions recorded in the audit trail so far.

    Args:
        translated (`str | os.PathLike`): translated records (the output of ``bimedix translate``).
        output (`str | os.PathLike`): where the records with the decisions applied are written.
        source (`str | os.PathLike`, *optional*): the English input, shown next to each text.
        queue (`str | os.PathLike`, *optional*): a queue file from ``review export`` (its rows set the items);
            by default the queue is drawn as ``review export`` draws it with ``fraction``, ``seed``,
            ``threshold``.
        audit (`str | os.PathLike`, *optional*): the audit trail; defaults to ``OUT.audit.jsonl``.

    Raises:
        `ValueError`: for a queue row naming an unknown record or text, or an empty queue.
        `bimedix.core.outputs.OutputError`: the output or the audit trail is an input, or they are one file.
    """

    def __init__(self, translated: str | os.PathLike, output: str | os.PathLike, *,
                 source: str | os.PathLike | None = None, queue: str | os.PathLike | None = None,
                 audit: str | os.PathLike | None = None, fraction: float = 0.05, seed: int = 0,
                 threshold: float = 80.0):
        self.output = Path(output)
        self.audit = Path(audit) if audit else self.output.with_name(
            self.output.name.removesuffix(".jsonl") + ".audit.jsonl")
        check_outputs({"--output": self.output, "--audit": self.audit},
                      {"--input": translated, "--source": source, "--queue": queue})
        self.records = list(read_records(translated))
        self.by_id = {record["id"]: record for record in self.records}
        self.warnings: list[str] = []
        self.items = self._queue(translated, queue, fraction=fraction, seed=seed, threshold=threshold)
        if not self.items:
            reviewed = sum(bool((r["meta"].get("translation") or {}).get("reviewed")) for r in self.records)
            raise ValueError(f"nothing to review in {translated}: no record is queued ({reviewed} of "
                             f"{len(self.records)} records are already reviewed); see `bimedix review stats`")
        self.english = self._english(source) if source else {}
        self.latest: dict[tuple[str, str], dict] = {}
        self.history: dict[str, list[dict]] = {}
        fields = {(item.id, name) for item in self.items.values() for name in item.fields}
        for entry in read_audit(self.audit):
            if (entry.get("id"), entry.get("field")) in fields:
                self.latest[(entry["id"], entry["field"])] = entry
                self.history.setdefault(entry["id"], []).append(entry)
        self.result = {record["id"]: self._applied(record) for record in self.records}
        self._dirty = bool(self.latest)  # rebuild the output of an earlier (maybe killed) run
        self._writing = threading.Lock()
        self.write_output()

    def state(self, item_id: str) -> str:
        """``undecided`` until every text of the item is decided, then the record's review state."""
        record = self.result[item_id]
        info = record["meta"]["translation"]
        return info["review_state"] if self._decided(self.items[item_id]) else "undecided"

    def progress(self) -> dict:
        """``{total, done, left, by_state: {state: count}}`` over the items."""
        states = [self.state(item_id) for item_id in self.items]
        by_state = {state: states.count(state) for state in STATES}
        return {"total": len(states), "done": len(states) - by_state["undecided"],
                "left": by_state["undecided"],
                "by_state": by_state}

    def listing(self, state: str | None = None, min_score: float | None = None,
                max_score: float | None = None) -> list[dict]:
        """``{id, score, state}`` of the items in queue order, filtered by state and score range."""
        rows = []
        for item_id in self.items:
            score = self.by_id[item_id]["meta"]["translation"].get("score")
            current = self.state(item_id)
            if state and current != state:
                continue
            if (min_score is not None or max_score is not None) and score is None:
                continue
            if (min_score is not None and score < min_score) or (max_score is not None and score > max_score):
                continue
            rows.append({"id": item_id, "score": score, "state": current})
        return rows

    def version(self, item_id: str) -> int:
        """The item's version: how many decision entries its texts have in the audit trail (0: undecided)."""
        return len(self.history.get(item_id, []))

    def view(self, item_id: str) -> dict:
        """Everything the page shows for one item: texts side by side, score, comments, warnings, history,
        and the `version` a decision on it must name."""
        item = self._item(item_id)
        record = self.by_id[item_id]
        info = record["meta"]["translation"]
        original = self.english.get(info.get("source_id") or "")
        texts = []
        for name in item.fields:
            kind, _, index = name.partition(".")
            index = int(index)
            if kind == "options":
                label = f"Option {LETTERS['en'][index]} / {LETTERS['ar'][index]}"
            else:
                label = f"Turn {index + 1} ({record['conversations'][index]['from']})"
            decided = self.latest.get((item_id, name))
            texts.append({"field": name, "label": label, "english": text_of(original, name) if original
                          else None,
                          "original": text_of(record, name), "current": decided["after"] if decided else
                          text_of(record, name), "decision": decided["decision"] if decided else None})
        return {"id": item_id, "version": self.version(item_id), "task": record["task"],
                "score": info.get("score"), "comments": info.get("comments"),
                "review_state": info.get("review_state"), "state": self.state(item_id), "texts": texts,
                "warnings": self._invariant_warnings(record, original, texts) if original else
                ["no English original for this record in the source file"],
                "history": self.history.get(item_id, [])}

    def decide(self, item_id: str, action: str, texts: dict[str, str], *, reviewer: str,
               comment: str = "", version: int | None = None) -> dict:
        """Record ``action`` on every text of the item (``texts``: field -> Arabic as the reviewer leaves it).

        ``approve`` and ``edit`` approve each text, marking changed ones ``edit``; ``reject`` needs a reason
        in ``comment``. The decision is in the audit trail on disk when this returns; `write_output` writes
        the reviewed records. ``version`` is the item's `version` the reviewer saw (the web app always sends
        it): a decision on an older one is refused, so nobody silently reverts a decision they never saw.

        Raises:
            `StaleDecision`: ``version`` is not the item's current version; nothing is recorded then.
            `ValueError`: unknown action or text, empty text, no reviewer, a reject without reason, or an edit
                that makes the record invalid; nothing is recorded then.
        """
        item = self._item(item_id)
        if version is not None and version != self.version(item_id):
            last = self.history[item_id][-1] if self.history.get(item_id) else None
            since = f" ({last['reviewer']} decided it at {last['time']})" if last else ""
            raise StaleDecision(f"{item_id!r} changed after you opened it{since}; reload it to see the "
                                "current texts, then decide again")
        record = self.by_id[item_id]
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; expected one of {list(ACTIONS)}")
        if not reviewer.strip():
            raise ValueError("enter your name as reviewer first (it goes into the audit trail)")
        if action == "reject" and not comment.strip():
            raise ValueError("a rejection needs a reason in the comment")
        unknown = sorted(set(texts) - set(item.fields))
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a queued text of {item_id!r}")
        rows = []
        for name in item.fields:
            before = text_of(record, name)
            after = texts.get(name, self.latest[(item_id, name)]["after"] if (item_id, name) in self.latest
                              else before)
            decision = "reject" if action == "reject" else "approve" if after == before else "edit"
            row = {"id": item_id, "field": name, "arabic": after, "decision": decision, "before": before,
                   "comment": comment.strip()}
            problem = row_problem(record, row, "the translations")
            if problem:
                raise ValueError(f"{name}: {problem[1]}")
            rows.append(row)
        apply_decisions(record, rows)  # raises if the edit breaks the record
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        entries = [audit_entry(record, row, reviewer=reviewer.strip(), time=now) for row in rows]
        append_audit(self.audit, entries)
        for entry in entries:
            self.latest[(item_id, entry["field"])] = entry
        self.history.setdefault(item_id, []).extend(entries)
        self.result[item_id] = self._applied(record)
        self._dirty = True
        return self.view(item_id)

    def write_output(self) -> None:
        """Write every record, decisions applied, to the output if a decision came since the last write.

        Safe to call from another thread than `decide` (the web app writes after answering the page).
        """
        with self._writing:
            if not self._dirty:
                return
            self._dirty = False
            write_jsonl(self.output, list(self.result.values()))

    def stats(self) -> dict:
        """Judge-vs-reviewer agreement (`review_agreement`) over the records as reviewed so far."""
        return review_agreement(self.result.values())

    def _applied(self, record: dict) -> dict:
        """``record`` with its decisions applied when every queued text of it is decided, else as it is."""
        item = self.items.get(record["id"])
        if item is None or not self._decided(item):
            return record
        rows = [{"field": name, **self._row(record["id"], name)} for name in item.fields]
        return apply_decisions(record, rows)[0]

    def _row(self, item_id: str, name: str) -> dict:
        entry = self.latest[(item_id, name)]
        return {"decision": entry["decision"], "arabic": entry["after"]}

    def _decided(self, item: ReviewItem) -> bool:
        return all((item.id, name) in self.latest for name in item.fields)

    def _item(self, item_id: str) -> ReviewItem:
        if item_id not in self.items:
            raise KeyError(f"{item_id!r} is not in the review queue")
        return self.items[item_id]

    def _queue(self, translated, queue, **selection) -> dict[str, ReviewItem]:
        if queue is None:
            rows = queue_rows(self.records, **selection)
        else:
            rows, errors = [], []
            for row_no, row in read_review_rows(queue):
                problem = row_problem(self.by_id.get(row.get("id")), {"arabic": "-", "decision": "", **row},
                                      translated)
                if problem:
                    errors.append(f"{queue}:row {row_no}: column `{problem[0]}`: {problem[1]}")
                rows.append(row)
            if errors:
                raise ValueError(f"{len(errors)} queue row(s) do not match {translated}:\n"
                                 + "\n".join(errors[:10]))
        items: dict[str, ReviewItem] = {}
        for row in rows:
            item = items.setdefault(row["id"], ReviewItem(row["id"]))
            if row["field"] not in item.fields:
                item.fields.append(row["field"])
        return items

    def _english(self, source) -> dict[str, dict]:
        english = {record["id"]: record for record in read_records(source)}
        wanted = {self.by_id[item_id]["meta"]["translation"].get("source_id") for item_id in self.items}
        missing = sorted(str(source_id) for source_id in wanted if source_id not in english)
        if missing and len(missing) == len(wanted):
            raise ValueError(f"{source} holds none of the English originals of the queued translations "
                             f"(e.g. source_id {missing[0]!r}); is it the file that was translated?")
        if missing:
            self.warnings.append(f"{len(missing)} queued translation(s) have no English original in {source} "
                                 f"(e.g. {', '.join(missing[:3])}); they are shown without it")
            logger.warning(self.warnings[-1])
        return english

    def _invariant_warnings(self, record: dict, original: dict, texts: list[dict]) -> list[str]:
        current = {text["field"]: text["current"] for text in texts}
        translation = {"turns": [current.get(f"conversations.{i}", turn["value"])
                                 for i, turn in enumerate(record["conversations"])],
                       "options": [current.get(f"options.{i}", option)
                                   for i, option in enumerate(record["meta"].get("options") or [])]}
        source = {"turns": [turn["value"] for turn in original["conversations"]],
                  "options": list(original["meta"].get("options") or [])}
        return check_invariants(source, translation, protected_terms(source["turns"] + source["options"]))
