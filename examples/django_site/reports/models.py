from django.db import models


class Report(models.Model):
    """A report built in a session: its steps run on one worker."""

    QUEUED, RUNNING, DONE = "queued", "running", "done"

    title = models.CharField(max_length=200)
    status = models.CharField(max_length=16, default=QUEUED)
    session_id = models.CharField(max_length=64, blank=True)
    worker = models.CharField(max_length=255, blank=True)
    result = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.title} ({self.status})"
