"""A count of the table scans Spark ran: how a test or a benchmark shows that a job reads its
source once, and that Delta skipped files."""
from __future__ import annotations

import re

LISTENER_TIMEOUT_MS = 60_000


class TableScans:
    """The scans of a table's data files in the SQL executions Spark runs from now on, with the
    files each read, from the session's SQL status store (kept with the UI off too): how a test
    or a benchmark shows that a job reads its source once, and that Delta skipped files."""

    def __init__(self, spark):
        self._spark = spark
        self._store = spark._jsparkSession.sharedState().statusStore()
        self._seen = {execution.executionId() for execution in _java_list(self._store.executionsList())}

    def files_read(self, table: str) -> list[int]:
        """For each scan of ``table`` (its unqualified name) in the final plans of the executions
        since this counter was made, the number of data files it read."""
        scan = re.compile(rf"^Scan \w+ (?:[\w`]+\.)*`?{re.escape(table)}`?$")
        files = []
        for execution in self._executions():
            values = self._store.executionMetrics(execution.executionId())
            for node in _java_list(self._store.planGraph(execution.executionId()).allNodes()):
                if scan.match(node.name()):
                    read = [values.get(metric.accumulatorId()) for metric in _java_list(node.metrics())
                            if metric.name() == "number of files read"]
                    files.append(int(read[0].get()) if read and read[0].isDefined() else 0)
        return files

    def count(self, table: str) -> int:
        """How many times ``table``'s data files were scanned since this counter was made. Read
        from the plans' node details, which name each scan once, including a scan that adaptive
        execution dropped from the final plan (the side of a join it found empty)."""
        node = re.compile(rf"^\(\d+\) Scan \w+ (?:[\w`]+\.)*`?{re.escape(table)}`?(?: \[codegen id : \d+\])?$", re.M)
        return sum(len(node.findall(execution.physicalPlanDescription() or ""))
                   for execution in self._executions())

    def _executions(self) -> list:
        # The store is filled by a listener on Spark's event bus, after the action that ran an
        # execution has returned: read it once the bus has delivered every event posted so far.
        # (It raises a TimeoutException when the bus does not drain in that time.)
        self._spark.sparkContext._jsc.sc().listenerBus().waitUntilEmpty(LISTENER_TIMEOUT_MS)
        return [execution for execution in _java_list(self._store.executionsList())
                if execution.executionId() not in self._seen]


def _java_list(sequence) -> list:
    """A Scala or Java collection from the JVM as a Python list."""
    items, iterator = [], sequence.iterator()
    while iterator.hasNext():
        items.append(iterator.next())
    return items
