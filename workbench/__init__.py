"""The workbench's two faces over core: the Streamlit app (app.py) and the CLI (cli.py)."""
