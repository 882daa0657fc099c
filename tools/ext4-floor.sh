#!/usr/bin/env bash
# The floor: what ANY block-level copy-on-write snapshotter (thinpool, containerd's
# devmapper over dm-thin, a zvol) must keep per container that writes a 5-byte file,
# measured without thinpool (as root; docs/CONTAINERD.md has the figures):
#
#   tools/ext4-floor.sh [--size 10G] [--ext-opts A,B] [--mkfs-opts "OPTS"] [--base DIR]
#                       [--idle] [--keep]
#
# 1. The template, as the snapshotter made it before packed_meta_blocks
#    (src/snapshotter/store.rs, make_template; `--ext-opts packed_meta_blocks=1`
#    for today's): a sparse file of --size (the snapshotter's --volume-size,
#    default 10G), `mkfs.ext4 -q -F -L thinpool -E lazy_itable_init=1,
#    lazy_journal_init=1,nodiscard` (plus --ext-opts in that -E list: a second
#    -E would replace it) and --mkfs-opts (to try layouts); the template's
#    allocated size is printed.
#    --base DIR: copy DIR's tree into it first (an unpacked image layer), so the
#    container's file system is a layer's, not the empty template.
# 2. A container: a sparse copy of the template on a loop device (direct I/O, as
#    the snapshotter attaches), mounted with the snapshotter's options
#    (rw,noatime,noinit_itable), `printf hello > /hello.txt` (not with --idle),
#    umount.
# 3. Every 4 KiB block that differs between the template and the copy, named
#    (superblock, group descriptors, bitmaps, inode table with its inodes,
#    directory, file data, journal) from dumpe2fs and debugfs; then the total,
#    and what a thinpool volume (4 KiB pool blocks, radix map of 504 entries
#    per node) would copy of its block map for those blocks: the distinct map
#    nodes on their paths (root, level-1 nodes, leaves of 504 blocks).
#
# MKFS_OPTS and EXT_OPTS in the environment are the same as --mkfs-opts and
# --ext-opts.
set -euo pipefail

size=10G
extra=${MKFS_OPTS:-}
ext=${EXT_OPTS:-}
base=""
idle=0
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
    --size) size=$2; shift ;;
    --mkfs-opts) extra=$2; shift ;;
    --ext-opts) ext=$2; shift ;;
    --base) base=$2; shift ;;
    --idle) idle=1 ;;
    --keep) keep=1 ;;
    -h | --help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "ext4-floor: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
opts=rw,noatime,noinit_itable # the snapshotter's RW_OPTIONS

w=$(mktemp -d /var/tmp/ext4-floor.XXXXXX)
dev=""
cleanup() {
    mountpoint -q "$w/mnt" 2>/dev/null && umount "$w/mnt"
    [ -n "$dev" ] && losetup -d "$dev" 2>/dev/null
    if [ "$keep" = 1 ]; then echo "kept $w" >&2; else rm -rf "$w"; fi
}
trap cleanup EXIT
mkdir "$w/mnt"

truncate -s "$size" "$w/template.img"
# shellcheck disable=SC2086 # $extra is a list of options
mkfs.ext4 -q -F -L thinpool -E "lazy_itable_init=1,lazy_journal_init=1,nodiscard${ext:+,$ext}" $extra "$w/template.img"
echo "template (mkfs.ext4 -E lazy_itable_init=1,lazy_journal_init=1,nodiscard${ext:+,$ext} $extra):" \
    "$(du -k "$w/template.img" | cut -f1) KiB allocated"
if [ -n "$base" ]; then
    dev=$(losetup --find --show --direct-io=on "$w/template.img")
    mount -t ext4 -o "$opts" "$dev" "$w/mnt"
    cp -a "$base/." "$w/mnt/"
    umount "$w/mnt"
    losetup -d "$dev"
    dev=""
fi

cp --sparse=always "$w/template.img" "$w/container.img"
dev=$(losetup --find --show --direct-io=on "$w/container.img")
mount -t ext4 -o "$opts" "$dev" "$w/mnt"
[ "$idle" = 1 ] || printf hello >"$w/mnt/hello.txt"
umount "$w/mnt"
losetup -d "$dev"
dev=""

python3 - "$w/template.img" "$w/container.img" <<'EOF'
import os, re, subprocess, sys

B = 4096
FANOUT = 504  # thinpool's map entries per 4 KiB node: (4096 - 64) / 8
tpl, img = sys.argv[1], sys.argv[2]

def extents(path):
    fd = os.open(path, os.O_RDONLY)
    end = os.fstat(fd).st_size
    off, out = 0, []
    while off < end:
        try:
            d = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        out.append((d // B, (h + B - 1) // B))
        off = h
    os.close(fd)
    return out, end // B

def read(f, b):
    f.seek(b * B)
    return f.read(B).ljust(B, b"\0")

ea, n = extents(tpl)
eb, _ = extents(img)
cand = set()
for lo, hi in ea + eb:
    cand.update(range(lo, hi))
changed, new = [], set()
data_a = set()
for lo, hi in ea:
    data_a.update(range(lo, hi))
with open(tpl, "rb") as fa, open(img, "rb") as fb:
    for b in sorted(cand):
        if read(fa, b) != read(fb, b):
            changed.append(b)
            if b not in data_a:
                new.add(b)

# Name the blocks: group metadata from dumpe2fs, the journal's blocks and
# everything else through debugfs (icheck: block -> inode; ncheck: inode -> path).
what = {}
dump = subprocess.run(["dumpe2fs", img], capture_output=True, text=True).stdout
ipg = int(re.search(r"Inodes per group:\s+(\d+)", dump).group(1))
isz = int(re.search(r"Inode size:\s+(\d+)", dump).group(1))
group = None
def rng(s):
    a, _, b = s.partition("-")
    return int(a), int(b or a)
for line in dump.splitlines():
    m = re.match(r"Group (\d+):", line)
    if m:
        group = int(m.group(1))
    for pat, name in [(r"superblock at (\d+(?:-\d+)?)", "superblock"),
                      (r"Group descriptors at (\d+(?:-\d+)?)", "group descriptors"),
                      (r"Reserved GDT blocks at (\d+(?:-\d+)?)", "reserved GDT"),
                      (r"Block bitmap at (\d+)", "block bitmap"),
                      (r"Inode bitmap at (\d+)", "inode bitmap"),
                      (r"Inode table at (\d+-\d+)", "inode table")]:
        m = re.search(pat, line)
        if m and group is not None:
            lo, hi = rng(m.group(1))
            for b in changed:
                if lo <= b <= hi:
                    if name == "inode table":
                        first = group * ipg + (b - lo) * B // isz + 1
                        what[b] = f"inode table of group {group} (inodes {first}-{first + B // isz - 1})"
                    else:
                        what[b] = f"{name} of group {group}"
def debugfs(cmd):
    return subprocess.run(["debugfs", "-R", cmd, img], capture_output=True, text=True).stdout
rest = [b for b in changed if b not in what]
inode_of = {}
if rest:
    for line in debugfs("icheck " + " ".join(map(str, rest))).splitlines():
        f = line.split()
        if len(f) >= 2 and f[0].isdigit() and f[1].isdigit():
            inode_of[int(f[0])] = int(f[1])
inos = sorted(set(inode_of.values()))
path_of = {}
if inos:
    for line in debugfs("ncheck " + " ".join(map(str, inos))).splitlines():
        f = line.split(None, 1)
        if len(f) == 2 and f[0].isdigit():
            path_of[int(f[0])] = f[1]
for b in rest:
    i = inode_of.get(b)
    if i == 8:
        what[b] = "journal (inode 8)"
    elif i == 2:
        what[b] = "root directory's block (inode 2)"
    elif i is not None:
        what[b] = f"inode {i} ({path_of.get(i, '?')})"
    else:
        what[b] = "not owned by an inode"

depth, cap = 1, FANOUT
while cap < n:
    cap *= FANOUT
    depth += 1
nodes = set()
for b in changed:
    for level in range(depth):
        nodes.add((level, b // FANOUT ** (level + 1)))

print(f"{'ext4 block':>10}  {'map leaf':>8}  what (new: a hole in the template)")
for b in changed:
    print(f"{b:>10}  {b // FANOUT:>8}  {what[b]}{' (new)' if b in new else ''}")
kinds = {}
for b in changed:
    k = re.sub(r" of group \d+.*| \(.*", "", what[b])
    kinds[k] = kinds.get(k, 0) + 1
print("blocks by kind: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
print(f"floor: {len(changed)} blocks of 4 KiB = {len(changed) * 4} KiB "
      f"({len(changed) - len(new)} copied, {len(new)} new)")
leaves = len({x for x in nodes if x[0] == 0})
print(f"thinpool's map (depth {depth}): {len(nodes)} nodes on their paths = "
      f"{len(nodes) * 4} KiB ({leaves} leaves); with the blocks: "
      f"{(len(changed) + len(nodes)) * 4} KiB")
chunks = len({b // 16 for b in changed})
print(f"at 64 KiB blocks (dm-thin's smallest, containerd's devmapper): {chunks} blocks "
      f"= {chunks * 64} KiB")
EOF
