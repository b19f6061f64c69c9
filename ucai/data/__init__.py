"""Data modules and the JSONL/CSV files the stages read and write."""
