"""The README stays a manual read in fifteen minutes, and the pages it links stay reachable: its size,
the width of every line, and every relative link and #anchor in README.md, CHANGELOG.md and docs/."""
import glob
import os
import re

import pytest

from conftest import ROOT

PAGES = ['README.md', 'CHANGELOG.md', *sorted(glob.glob('docs/*.md', root_dir=ROOT))]
LINK = re.compile(r'\]\(([^)\s]+)\)')


def read(page):
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
        return f.read()


def prose(text):
    """The text outside fenced code blocks, where a '#' starts a comment, not a heading."""
    return re.sub(r'^ *```.*?^ *```', '', text, flags=re.M | re.S)


def anchors(page):
    """The #anchors of a page's headings, as GitHub makes them: lowercase, punctuation dropped, spaces
    to '-', and a repeated one numbered."""
    seen = {}
    for title in re.findall(r'^#{1,6} +(.+?) *#* *$', prose(read(page)), re.M):
        slug = re.sub(r'[^\w\- ]', '', title.strip().lower()).replace(' ', '-')
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f'{slug}-{seen[slug]}'


def test_readme_is_at_most_20000_bytes():
    assert os.path.getsize(os.path.join(ROOT, 'README.md')) <= 20_000


@pytest.mark.parametrize('page', PAGES)
def test_lines_are_at_most_110_characters(page):
    long = [f'{page}:{n}' for n, line in enumerate(read(page).splitlines(), 1) if len(line) > 110]
    assert not long


@pytest.mark.parametrize('page', PAGES)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(read(page))):
        if re.match(r'[a-z]+:', target):  # https:, mailto:: not checked here
            continue
        path, _, anchor = target.partition('#')
        linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, linked)):
            broken.append(f'{target}: no file {linked}')
        elif anchor and anchor not in set(anchors(linked)):
            broken.append(f'{target}: no heading #{anchor} in {linked}')
    assert not broken


def test_every_docs_page_is_linked_from_the_readme():
    linked = {os.path.normpath(target.partition('#')[0]) for target in LINK.findall(read('README.md'))}
    assert {page for page in PAGES if page.startswith('docs/')} <= linked


def test_each_runtime_dependency_has_its_line_in_the_readme():
    """requirements.txt's runtime part (above '# Tests') against the README's Dependencies table."""
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        runtime = f.read().split('# Tests')[0]
    packages = {line.split('==')[0].lower() for line in runtime.splitlines() if '==' in line}
    table = {name.lower() for name in re.findall(r'^\| ([\w.-]+) \| .+ \|$', read('README.md'), re.M)}
    assert packages and packages <= table, packages - table
