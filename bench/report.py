"""Turns the raw figures of bench/run.sh into the markdown report.

    python3 report.py META RESULTS_TSV LIMITS_TSV > report.md

With several runs per workload and tool, each figure is the median of the runs that got
that far.
"""

import csv
import statistics
import sys

MIB = 1048576


def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def median(rows, key):
    vals = [num(r.get(key)) for r in rows if num(r.get(key)) is not None]
    return statistics.median(vals) if vals else None


def fmt(v, digits=2, scale=1.0):
    return "–" if v is None else "%.*f" % (digits, v / scale)


def secs(v):
    """Seconds to three significant digits."""
    return "–" if v is None else "%.3g" % v


def pct(limit_s, ours_s):
    """Our speed as a share of dd's for the same bytes: dd's time over ours."""
    if limit_s is None or not ours_s:
        return "–"
    return "%.0f%%" % (100 * limit_s / ours_s)


def ratio(a, b):
    return "–" if a is None or not b else "%.2f" % (a / b)


def main():
    meta_path, results_path, limits_path = sys.argv[1:4]
    meta = [line.rstrip("\n") for line in open(meta_path) if line.strip()]
    results = read_tsv(results_path)
    limits = {r["workload"]: r for r in read_tsv(limits_path)}

    workloads = list(dict.fromkeys(r["workload"] for r in results))
    tools = list(dict.fromkeys(r["tool"] for r in results))
    groups = {(w, t): [r for r in results if r["workload"] == w and r["tool"] == t]
              for w in workloads for t in tools}

    out = []
    p = out.append
    p("# torpor benchmark")
    p("")
    for line in meta:
        p("- " + line)
    p("")

    p("## Dump and restore")
    p("")
    p("| workload | tool | process RSS MiB | dump s | frozen s | image MiB | restore s "
      "| answers after s | check s (before / after) | tool peak RSS MiB (dump / restore) | intact |")
    p("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    notes = []
    for w in workloads:
        for t in tools:
            rows = groups[(w, t)]
            if not rows:
                continue
            ok = sum(r["intact"] == "yes" for r in rows)
            intact = "yes" if ok == len(rows) else "%d of %d" % (ok, len(rows))
            if ok == 0:
                # Say where it went wrong when no run got as far as a check.
                failed = [r["note"] for r in rows if r["intact"] != "no"]
                intact = "**%s**" % (failed[0] if failed else "no")
            for r in rows:
                if r["note"] not in ("", "-"):
                    notes.append("%s, %s, run %s: %s" % (w, t, r["rep"], r["note"]))
            dump_rss = median(rows, "dump_rss_kib")
            restore_rss = median(rows, "restore_rss_kib")
            p("| %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %s / %s | %s |" % (
                w, t, fmt(median(rows, "rss_mib"), 0), secs(median(rows, "dump_s")),
                secs(median(rows, "frozen_s")), fmt(median(rows, "image_bytes"), 0, MIB),
                secs(median(rows, "restore_s")), secs(median(rows, "answer_s")),
                secs(median(rows, "check_before_s")), secs(median(rows, "check_after_s")),
                fmt(dump_rss, 1, 1024),
                fmt(restore_rss, 1, 1024), intact))
    p("")
    p("- *dump s*, *restore s*: wall time of the command (restore with `--detach`, or CRIU's "
      "`-d`: until the process runs).")
    p("- *frozen s*: how long the process was stopped, as the tool reports it.")
    p("- *image MiB*: what the image directory takes on disk (`du`).")
    p("- *answers after s*: from the start of restore until the process answered: Redis a "
      "`PING`; the others a request to check all their memory, which includes the check itself: "
      "*check s* is how long the process's own check took before the dump and after "
      "restore.")
    p("- *intact*: the check found every byte (Redis: `DBSIZE` and `DEBUG DIGEST` as before "
      "the dump).")
    if notes:
        p("")
        p("Failures:")
        p("")
        for n in notes:
            p("- " + n)
    p("")

    if limits:
        p("## Against the disk")
        p("")
        p("dd writes and reads as many bytes as torpor's image, on the same filesystem, right "
          "after the workload (`bs=1M`; *cache*: buffered, no sync; *fsync*: "
          "`conv=fsync`; *direct*: `oflag=direct` / `iflag=direct`; the buffered read finds "
          "the file in the page cache, as restore finds an image just dumped).")
        p("")
        p("| workload | MiB | write cache s | write fsync s | write direct s | read cache s "
          "| read direct s |")
        p("|---|---:|---:|---:|---:|---:|---:|")
        for w in workloads:
            lim = limits.get(w)
            if not lim:
                continue
            p("| %s | %s | %s | %s | %s | %s | %s |" % (
                w, fmt(num(lim["bytes"]), 0, MIB), secs(num(lim["write_cache_s"])),
                secs(num(lim["write_fsync_s"])), secs(num(lim["write_direct_s"])),
                secs(num(lim["read_cache_s"])), secs(num(lim["read_direct_s"]))))
        p("")
        p("torpor's speed as a share of dd's for the same bytes (dd's time ÷ torpor's; over "
          "100% is faster than dd):")
        p("")
        p("| workload | dump vs write fsync | dump vs write direct | frozen vs write fsync "
          "| restore vs read cache | restore vs read direct | answer vs read direct |")
        p("|---|---:|---:|---:|---:|---:|---:|")
        for w in workloads:
            lim = limits.get(w)
            rows = groups.get((w, "torpor"))
            if not lim or not rows:
                continue
            dump, frozen = median(rows, "dump_s"), median(rows, "frozen_s")
            restore, answer = median(rows, "restore_s"), median(rows, "answer_s")
            wf, wd = num(lim["write_fsync_s"]), num(lim["write_direct_s"])
            rc, rd = num(lim["read_cache_s"]), num(lim["read_direct_s"])
            p("| %s | %s | %s | %s | %s | %s | %s |" % (
                w, pct(wf, dump), pct(wd, dump), pct(wf, frozen), pct(rc, restore),
                pct(rd, restore), pct(rd, answer)))
        p("")

    if "torpor-lazy" in tools:
        p("## Lazy restore")
        p("")
        p("`torpor restore --lazy --detach`: the process runs before its memory is loaded. "
          "*answers after s*: from the start of restore to the process's reply to a ping "
          "(Redis: `PING`), which touches almost none of its memory; *all loaded s*: what "
          "torpor's page server reports for loading every page, counted from the release "
          "of the process; *check after s*: the process's full check of its memory, which "
          "faults in what is not there yet.")
        p("")
        p("| workload | restore s (eager) | answers after s (eager) | restore s (lazy) "
          "| answers after s (lazy) | all loaded s | check after s (lazy) | intact |")
        p("|---|---:|---:|---:|---:|---:|---:|---|")
        for w in workloads:
            e, z = groups.get((w, "torpor"), []), groups.get((w, "torpor-lazy"), [])
            if not z:
                continue
            ok = sum(r["intact"] == "yes" for r in z)
            p("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                w, secs(median(e, "restore_s")), secs(median(e, "answer_s")),
                secs(median(z, "restore_s")), secs(median(z, "answer_s")),
                secs(median(z, "loaded_s")), secs(median(z, "check_after_s")),
                "yes" if ok == len(z) else "%d of %d" % (ok, len(z))))
        p("")

    if "criu" in tools:
        p("## torpor ÷ CRIU")
        p("")
        p("Medians of torpor's figures over CRIU's (below 1: torpor is faster or smaller).")
        p("")
        p("| workload | dump | frozen | image | restore | answers after | peak RSS dump "
          "| peak RSS restore | CRIU intact |")
        p("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for w in workloads:
            a, b = groups[(w, "torpor")], groups[(w, "criu")]
            if not b:
                continue
            cols = [ratio(median(a, k), median(b, k)) for k in (
                "dump_s", "frozen_s", "image_bytes", "restore_s", "answer_s",
                "dump_rss_kib", "restore_rss_kib")]
            ok = sum(r["intact"] == "yes" for r in b)
            status = "yes" if ok == len(b) else ("failed" if ok == 0 else "%d of %d" % (
                ok, len(b)))
            p("| %s | %s | %s |" % (w, " | ".join(cols), status))
        p("")

    if any(len(rows) > 1 for rows in groups.values()):
        p("## Every run")
        p("")
        p("| workload | tool | run | dump s | frozen s | restore s | answers after s "
          "| intact |")
        p("|---|---|---:|---:|---:|---:|---:|---|")
        for r in results:
            p("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                r["workload"], r["tool"], r["rep"], r["dump_s"], r["frozen_s"],
                r["restore_s"], r["answer_s"], r["intact"]))
        p("")

    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()
