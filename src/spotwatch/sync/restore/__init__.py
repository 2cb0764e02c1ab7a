"""`spotwatch restore`: download the newest complete checkpoint set, never an incomplete one.

A set counts only when its manifest is valid for the configured prefix and every file it lists
is in S3 with the listed size. Every file is downloaded under a temporary name
(destination.temporary) and checked against the manifest's size and checksum; only when all
files of the set check out are they renamed into place, with their original mtime, so a rerun
skips what is already there and the daemon does not upload them again. The files of a set
download concurrently (sync.downloads), each checked against its manifest entry as its bytes
arrive where the store can (aws.ranged_get, the CRT), else read back once written; the set's
completeness is checked beside them. A set whose bytes do not match is corrupt: its downloads
are removed and the next older complete set is restored instead, with a warning; so is an
incomplete one. Temporaries that a restore stopped by kill -9 left are removed by the next one.

Numbered set directories come before other numbered sets, with the top-level files beside
them; a set without a number is then no checkpoint (candidates.checkpoints_first). A pointer
among those files is made to name the set restored (sync.pointers).
A set of symlinks only (Lightning's `last.ckpt`) is never the checkpoint restored: once the
files are in place, the links of the set restored and of those sets are made again wherever
their target is there (sync.links). A link of the set restored into another set (step_200's
`embed.pt -> ../step_100/embed.pt`), whose file the manifest records (LinkEntry.file), is part
of the set: the set is complete only while that object is whole in S3, and the link is made
where that file is on disk and verifies, else the object's bytes are restored in the link's
place, verified like every other file of the set (set_fetch._linked_here). So is a link to a
directory of another set (`tokenizer -> ../step_100/tokenizer`, LinkEntry.files): made where
every file of that directory is on disk and verifies, else those files are restored below the
link's path.

On a multi-node job a set counts only when it is complete for the whole job (sync.sets.parts):
the whole set is restored, or with --node-rank only the files that node's part lists.

The modules, each importing only from those listed before it:
- candidates: which sets restore tries, and in what order;
- journal: what the ledger records of a set restored into the watched directory;
- destination: where a set's files land below the destination, and their temporaries;
- set_fetch: one set downloaded, verified and placed, or passed over for the next older;
- beside: what comes with the set restored, its companions and links;
- run: restore() itself, choosing the watched directory, the destination and the sets.
"""
