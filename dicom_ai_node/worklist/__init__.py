"""The node's pull side: batch jobs that query a PACS (C-FIND) and pull what matches (C-MOVE) into the same
receive path as pushed studies, on a schedule (apscheduler) or on an operator's command.

query.py builds identifiers and reads answers (pure); qr.py speaks Query/Retrieve to the source; batch.py
runs one job and records per-study progress in the job store; schedule.py runs jobs on their schedules
inside `dicom-ai-node serve`.
"""
