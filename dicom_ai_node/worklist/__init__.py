"""The node's pull side: batch jobs that query a PACS (C-FIND) or a Modality Worklist and pull what matches
(C-MOVE or C-GET) into the same receive path as pushed studies, on a schedule (apscheduler) or on an
operator's command.

query.py builds identifiers and reads answers (pure); qr.py speaks Query/Retrieve and Modality Worklist to
the sources; get.py stores what a C-GET brings back; batch.py runs one job and records per-study progress in
the job store; schedule.py runs jobs on their schedules inside `dicom-ai-node serve`.
"""
