"""What watches finished requests: drift windows and scores, canary statistics and verdicts,
the dashboard's traffic samples, the request-log writer and the Alertmanager intake."""
