"""Parse/chunk fixtures: the corpus parsed once per session (both extractors), tokenizers, and
crafted hostile PDFs (decompression bomb, exponential XObject fan-out) built byte by byte.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.parse import ParseLimits, ParserPool
from pipeline.types import ParsedDocument, PipelineError
from tests.corpus_expectations import EXPECTED, parsed_pdfs

CORPUS_LIMITS = ParseLimits(max_pages=2000, timeout_s=300, memory_mb=2048)


@pytest.fixture(scope="session")
def parser_pool() -> Iterator[ParserPool]:
    pool = ParserPool()
    yield pool
    pool.close()


def _parse_all(pool: ParserPool, corpus_dir: Path, names: list[str], extractor: str
               ) -> dict[str, ParsedDocument | PipelineError]:
    def one(name: str) -> ParsedDocument | PipelineError:
        try:
            return pool.parse(corpus_dir / name, extractor=extractor, limits=CORPUS_LIMITS)
        except PipelineError as exc:
            return exc

    # Two children at once: the corpus is parsed once per session, as fast as two cores allow.
    with ThreadPoolExecutor(2) as executor:
        return dict(zip(names, executor.map(one, names), strict=True))


@pytest.fixture(scope="session")
def corpus_results(parser_pool: ParserPool, corpus_dir: Path) -> dict[str, ParsedDocument | PipelineError]:
    """Every corpus file through parse_file's machinery with the default (PDFium) extractor."""
    return _parse_all(parser_pool, corpus_dir, sorted(EXPECTED), "pdfium")


@pytest.fixture(scope="session")
def corpus_results_pypdf(parser_pool: ParserPool, corpus_dir: Path) -> dict[str, ParsedDocument | PipelineError]:
    """Every corpus PDF that parses, through the pypdf extractor (slow: run once per session)."""
    return _parse_all(parser_pool, corpus_dir, parsed_pdfs(), "pypdf")


@pytest.fixture(scope="session")
def parsed_corpus(corpus_results) -> dict[str, ParsedDocument]:
    return {name: r for name, r in corpus_results.items() if isinstance(r, ParsedDocument)}


@pytest.fixture(scope="session")
def minilm():
    from pipeline.tokens import load_tokenizer

    return load_tokenizer("all-MiniLM-L6-v2")


def _train_bpe(tmp_path_factory, corpus_dir: Path, *, trim_offsets: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from pipeline.tokens import load_tokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [(corpus_dir / n).read_text(encoding="utf-8") for n in
             ("contract-cerence-ip.txt", "contract-galera-joint-filing.txt", "README.md")]
    tokenizer.train_from_iterator(texts, trainer)
    checkpoint = tmp_path_factory.mktemp("bpe-checkpoint")
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    return load_tokenizer(str(checkpoint))


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory, corpus_dir: Path):
    """A byte-level BPE tokenizer (GPT-NeoX's kind) trained here on corpus text, saved as a checkpoint
    directory with tokenizer.json and loaded through load_tokenizer like an MPT checkpoint."""
    return _train_bpe(tmp_path_factory, corpus_dir, trim_offsets=True)


@pytest.fixture(scope="session")
def bpe_untrimmed_tokenizer(tmp_path_factory, corpus_dir: Path):
    """The same, with offsets that keep each word's leading space (as the engine's own
    pipeline/engine/init_checkpoint.py tokenizer writes them)."""
    return _train_bpe(tmp_path_factory, corpus_dir, trim_offsets=False)


# --- crafted PDFs -------------------------------------------------------------------------

def build_pdf(objects: list[bytes]) -> bytes:
    """A well-formed PDF: objects[i] is the body of object i + 1; object 1 is the catalog."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def pdf_stream(data: bytes, dictionary: bytes = b"") -> bytes:
    return b"<< /Length %d %s >>\nstream\n" % (len(data), dictionary) + data + b"\nendstream"


def one_page_pdf(content: bytes, extra_objects: tuple[bytes, ...] = (), xobjects: bytes = b"") -> bytes:
    """Objects: 1 catalog, 2 pages, 3 page, 4 Helvetica, 5 the page content, 6.. extra_objects."""
    return build_pdf([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> "
        + xobjects + b" >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        content,
        *extra_objects,
    ])


def text_pdf(text: str) -> bytes:
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")
    return one_page_pdf(pdf_stream(b"BT /F1 12 Tf 72 720 Td (" + escaped + b") Tj ET"))


def decompression_bomb_pdf(inflated_mb: int) -> bytes:
    """One page whose FlateDecode content stream (about inflated_mb / 1000 MB on disk) inflates to
    inflated_mb MB of spaces. Built from one compressed 1 MiB block repeated after full flushes, so
    a GB-scale bomb costs a second to make; the Adler-32 trailer is right, the stream valid."""
    block = b" " * (1 << 20)
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeat = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(inflated_mb):
        checksum = zlib.adler32(block, checksum)
    end = compressor.flush()[:-4] + checksum.to_bytes(4, "big")
    data = first + repeat * (inflated_mb - 1) + end
    return one_page_pdf(pdf_stream(data, b"/Filter /FlateDecode"))


def xobject_fanout_pdf(depth: int, fan_out: int) -> bytes:
    """Form XObject k draws XObject k-1 fan_out times; XObject 0 shows a word; the page draws the
    top one: fan_out ** depth text draws from a few hundred bytes (a 'billion laughs' PDF that keeps
    a parser busy for hours)."""
    form = b"/Type /XObject /Subtype /Form /BBox [0 0 612 792]"
    objects = [pdf_stream(b"BT /F1 12 Tf 72 720 Td (loop) Tj ET", form + b" /Resources << /Font << /F1 4 0 R >> >>")]
    for level in range(1, depth + 1):
        objects.append(pdf_stream(b" ".join([b"q /X Do Q"] * fan_out),
                                  form + b" /Resources << /XObject << /X %d 0 R >> >>" % (5 + level)))
    top = 5 + depth + 1
    return one_page_pdf(pdf_stream(b"q /X Do Q"), tuple(objects), xobjects=b"/XObject << /X %d 0 R >>" % top)


def fanout_pages_pdf(pages: int) -> bytes:
    """`pages` pages that all draw one endless XObject fan-out: any text extraction would time out."""
    first_page, font = 3, 3 + pages
    content, xobject0 = font + 1, font + 2
    form = b"/Type /XObject /Subtype /Form /BBox [0 0 612 792]"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [%s] /Count %d >>"
               % (b" ".join(b"%d 0 R" % (first_page + i) for i in range(pages)), pages)]
    depth = 8
    top = xobject0 + depth
    objects += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /XObject << /X %d 0 R >> "
                b">> /Contents %d 0 R >>" % (top, content)] * pages
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    objects.append(pdf_stream(b"q /X Do Q"))
    objects.append(pdf_stream(b"BT /F1 12 Tf 72 720 Td (loop) Tj ET",
                              form + b" /Resources << /Font << /F1 %d 0 R >> >>" % font))
    for level in range(1, depth + 1):
        objects.append(pdf_stream(b" ".join([b"q /X Do Q"] * 16),
                                  form + b" /Resources << /XObject << /X %d 0 R >> >>" % (xobject0 + level - 1)))
    return build_pdf(objects)
