"""Browser apps (``pip install 'bimedix[web]'``): the translation review app and the bilingual chat page.

Both are small FastAPI apps serving one self-contained HTML page each (no files from disk other than the
review store, nothing fetched from the internet), run by uvicorn on 127.0.0.1 by default.
"""
