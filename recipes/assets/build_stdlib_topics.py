"""Builds stdlib_topics.jsonl: docstrings of Python standard-library callables labelled by module topic.

Real English technical text that ships with Python itself. Rebuild with:
    python recipes/assets/build_stdlib_topics.py > recipes/assets/stdlib_topics.jsonl
"""
import importlib
import inspect
import json
import random

TOPICS = {
    0: ("text", ["string", "textwrap", "re", "difflib", "unicodedata", "html", "html.parser", "codecs",
                 "locale", "gettext", "shlex", "stringprep", "str"]),
    1: ("maths", ["math", "cmath", "statistics", "fractions", "decimal", "random", "numbers", "operator",
                  "bisect", "heapq", "itertools"]),
    2: ("files_os", ["os", "os.path", "shutil", "pathlib", "glob", "tempfile", "stat", "io", "zipfile",
                     "tarfile", "fnmatch", "filecmp", "gzip", "bz2", "lzma", "subprocess", "signal"]),
    3: ("network", ["socket", "ssl", "http.client", "http.server", "http.cookies", "urllib.request",
                    "urllib.parse", "email.message", "email.utils", "smtplib", "ftplib", "imaplib",
                    "poplib", "xmlrpc.client", "ipaddress", "selectors", "socketserver", "mimetypes"]),
}


def docs(obj, depth=0):
    for name, member in inspect.getmembers(obj):
        if name.startswith("_"):
            continue
        if inspect.isroutine(member) or inspect.isclass(member):
            d = inspect.getdoc(member)
            if d:
                yield d
            if inspect.isclass(member) and depth == 0:
                yield from docs(member, depth + 1)


def main():
    seen, rows = set(), []
    for label, (topic, mods) in TOPICS.items():
        for m in mods:
            obj = str if m == "str" else importlib.import_module(m)
            for d in docs(obj):
                para = " ".join(d.split("\n\n")[0].split())
                if not (25 <= len(para) <= 400) or para in seen or para.startswith(("Return self", "Create and return")):
                    continue
                seen.add(para)
                rows.append({"text": para, "label": label, "topic": topic, "module": m})
    random.Random(0).shuffle(rows)
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
