"""Write-protect tools: live snapshots and dirty-page tracking of a running program's memory."""
