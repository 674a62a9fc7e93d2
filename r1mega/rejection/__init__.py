"""Rejection sampling (``r1mega sample``): verified, readable completions of a checkpoint as SFT data."""

from r1mega.rejection.filters import REASONS, FilterSettings, rejection_reason, runaway_repetition, select
from r1mega.rejection.sample import (filter_settings, rejection_sample, report_path, report_table, sample_command,
                                     sft_row)

__all__ = ["FilterSettings", "REASONS", "filter_settings", "rejection_reason", "rejection_sample", "report_path",
           "report_table", "runaway_repetition", "sample_command", "select", "sft_row"]
