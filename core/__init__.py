"""QA Tuning Workbench core: every piece of logic, no user interface.

Nothing in this package may import streamlit; pages and the CLI call into it.
"""
