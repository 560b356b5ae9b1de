"""ClientAI programs run by tests/test_clientai.py, in process and under opentelemetry-instrument."""
