"""Speed of reading and importing the original CPM-Bee dataset format (``cpmbee dataset import-original``).

Generates an original-format dataset of a realistic size (default 100,000 records, ~225 MB of records: a third
``{"text": ...}`` documents of 1-3k characters, the rest CPM-Bee choice dicts; 16 MiB blocks as the
original's default; three pickled files and one JSON file), then measures, ``--repeats`` rounds of the three interleaved (medians reported):

* ``import``: ``cpmbee.data.tools.import_original`` into a fresh directory (decode, check, write shards);
* ``read``: every record through ``OriginalDataset`` (framing checks + restricted decoding), no writing;
* ``pickle.loads``: the same payloads given to plain ``pickle.loads`` / ``json.loads`` (what the original
  reader does, unsafe), to show what the safety checks cost.

    python benchmarks/bench_import_original.py [--records 100000] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from cpmbee.data.original import OriginalDataset, OriginalWriter
from cpmbee.data.tools import import_original

CHARS = list(
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坐集编宝谈府拉黑且随格尽剑讲布杀微怕母调局根曾准团段终乐切级克精哪官示冷域读"
)
PUNCT = list("，。！？；：")


class _Text:
    """Random Chinese-like text, sliced from one pre-drawn pool (fast to generate)."""

    def __init__(self, rng: np.random.RandomState, size: int = 1 << 20) -> None:
        chars = rng.choice(CHARS, size)
        chars[rng.randint(0, size, size // 20)] = rng.choice(PUNCT, size // 20)
        self.pool, self.rng = "".join(chars), rng

    def __call__(self, n: int) -> str:
        start = int(self.rng.randint(0, len(self.pool) - n))
        return self.pool[start : start + n]


def generate(directory: Path, records: int, seed: int = 0) -> int:
    rng = np.random.RandomState(seed)
    _text = _Text(rng)
    files = [("part-0", "pickle"), ("part-1", "pickle"), ("part-2", "pickle"), ("part-3", "json")]
    per_file = -(-records // len(files))
    written = 0
    for name, serializer in files:
        with OriginalWriter(directory, name, block_size=16 << 20, serializer=serializer) as w:
            for i in range(min(per_file, records - written)):
                if i % 3 == 0:
                    w.write({"text": _text(int(rng.randint(1000, 3000)))})
                else:
                    options = {f"<option_{k}>": _text(7) for k in range(4)}
                    w.write(
                        {
                            "input": _text(int(rng.randint(10, 60))),
                            "options": options,
                            "question": "哪一句古诗对应这句白话？",
                            "<ans>": f"<option_{int(rng.randint(4))}>",
                        }
                    )
                written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-import-", dir=args.workdir))
    try:
        src = work / "original"
        t = time.perf_counter()
        n = generate(src, args.records)
        size = OriginalDataset(src).nbytes  # record bytes (length fields + payloads), as meta.bin counts
        files = sum(p.stat().st_size for p in src.iterdir() if p.name != "meta.bin")
        print(
            f"generated {n:,} records: {size / 1e6:.1f} MB of records, {files / 1e6:.1f} MB of data files"
            f" (16 MiB blocks), in {time.perf_counter() - t:.1f} s; MB/s below are MB of records"
        )

        def run_import(i: int) -> None:
            out = work / f"imported-{i}"
            import_original(src, out)
            shutil.rmtree(out)

        def run_read(i: int) -> None:
            count = sum(1 for _ in OriginalDataset(src))
            assert count == n

        def run_plain(i: int) -> None:
            ds = OriginalDataset(src)
            count = 0
            for b in range(ds.num_blocks):
                for j in range(ds.block_length(b)):
                    payload = ds.block_payload(b, j)
                    (pickle.loads if payload[:1] == b"\x80" else json.loads)(payload)  # the unsafe baseline
                    count += 1
            assert count == n

        funcs = {"import": run_import, "read": run_read, "pickle.loads": run_plain}
        times: dict[str, list[float]] = {name: [] for name in funcs}
        for i in range(args.repeats):  # interleaved, so the three see the same machine load
            for name, func in funcs.items():
                t = time.perf_counter()
                func(i)
                times[name].append(time.perf_counter() - t)
        results = {}
        for name, runs in times.items():
            median = results[name] = statistics.median(runs)
            print(
                f"{name:>13}: median {median:6.2f} s of {args.repeats} "
                f"({', '.join(f'{x:.2f}' for x in runs)}): {n / median:9,.0f} records/s, {size / 1e6 / median:6.1f} MB/s"
            )
        print(f"read / pickle.loads time: {results['read'] / results['pickle.loads']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
