"""The order torch's CPU sort and topk give, ties included, without torch: which of equally scored MAGNeT spans
are masked decides the codes (magnet.py). torch's CPU kernels run libstdc++'s std::sort (introsort),
std::nth_element (introselect) and std::partial_sort (heap select) on (key, index) pairs compared by key only, so
the order of equal keys is theirs; these are those algorithms, step for step.
"""

from __future__ import annotations

import numpy as np


def torch_topk(keys: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest of `keys` (1-D) that torch's CPU topk picks, ties included (which decides
    which of equally scored spans are masked): libstdc++'s partial_sort (k * 64 <= n) or nth_element of
    (key, index) pairs by key. Without ties at the k-th key, any selection gives that set."""
    order = np.argsort(-keys, kind="stable")
    if k >= len(keys) or keys[order[k - 1]] != keys[order[k]]:
        return order[:k]
    pairs = [(float(key), i) for i, key in enumerate(keys)]
    (heap_select if k * 64 <= len(pairs) else nth_element)(pairs, k)
    return np.array([i for _, i in pairs[:k]], dtype=np.int64)


def before(x: tuple, y: tuple) -> bool:
    """torch's comparison for the largest: x's key above y's."""
    return x[0] > y[0]


def nth_element(a: list, k: int) -> None:
    """libstdc++'s std::nth_element(a, a + k - 1, end) by `before`: introselect (pivot_cut), then an insertion
    sort of the last few."""
    first, last, nth = 0, len(a), k - 1
    depth = depth_limit(len(a))
    while last - first > 3:
        cut = pivot_cut(a, first, last, depth)
        if cut is None:
            return
        depth -= 1
        if cut <= nth:
            first = cut
        else:
            last = cut
    insertion_sort(a, first, last)


def heap_select(a: list, k: int) -> None:
    """The first k of libstdc++'s std::partial_sort(a, a + k, end) by `before` (their set; its final sort of
    them is left out): make_heap of the first k, then each later item that beats the heap's top replaces it."""
    for parent in range((k - 2) // 2, -1, -1):
        adjust_heap(a, parent, k, a[parent])
    for i in range(k, len(a)):
        if before(a[i], a[0]):
            value, a[i] = a[i], a[0]
            adjust_heap(a, 0, k, value)


def adjust_heap(a: list, hole: int, length: int, value: tuple) -> None:
    """libstdc++'s __adjust_heap then __push_heap: sift the hole down to a leaf, then `value` up."""
    top, child = hole, hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if before(a[child], a[child - 1]):
            child -= 1
        a[hole], hole = a[child], child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[hole], hole = a[child - 1], child - 1
    parent = (hole - 1) // 2
    while hole > top and before(a[parent], value):
        a[hole], hole = a[parent], parent
        parent = (hole - 1) // 2
    a[hole] = value


def descending_order(keys: np.ndarray) -> np.ndarray:
    """Indices of `keys` (1-D) from the largest, ties in the order torch's CPU argsort(descending=True) gives them
    (which decides which of equally scored spans are masked): libstdc++'s std::sort (introsort) of (key, index)
    pairs by key. Without ties, any sort gives that order."""
    if len(np.unique(keys)) == len(keys):
        return np.argsort(-keys, kind="stable")
    pairs = [(float(key), i) for i, key in enumerate(keys)]
    introsort(pairs)
    return np.array([i for _, i in pairs], dtype=np.int64)


def introsort(a: list, threshold: int = 16) -> None:
    """libstdc++'s std::sort of `a` by `before` (descending keys), in place: median-of-three quicksort down to
    runs of `threshold` (pivot_cut), then one insertion sort."""
    def loop(first: int, last: int, depth: int) -> None:
        while last - first > threshold:
            cut = pivot_cut(a, first, last, depth)
            if cut is None:
                return
            depth -= 1
            loop(cut, last, depth)
            last = cut

    n = len(a)
    if n < 2:
        return
    loop(0, n, depth_limit(n))
    insertion_sort(a, 0, min(n, threshold))
    for i in range(threshold, n):
        linear_insert(a, i)


def depth_limit(n: int) -> int:
    """libstdc++'s bound on quicksort's depth: 2 floor(log2 n)."""
    return 2 * (n.bit_length() - 1)


def pivot_cut(a: list, first: int, last: int, depth: int) -> int | None:
    """One step of libstdc++'s introsort and introselect on a[first:last]: the median of three moved to the
    front and the rest partitioned around it; returns the cut. At the depth limit (which median-of-three pivots
    do not reach on such short score rows) the range is sorted outright instead (libstdc++ heapsorts it), and
    None is returned."""
    if depth == 0:
        a[first:last] = sorted(a[first:last], key=lambda pair: -pair[0])
        return None
    median_to_first(a, first, first + 1, first + (last - first) // 2, last - 1)
    return partition(a, first + 1, last, first)


def median_to_first(a: list, result: int, i: int, j: int, k: int) -> None:
    """libstdc++'s __move_median_to_first: the median of a[i], a[j], a[k] swapped into a[result]."""
    if before(a[i], a[j]):
        pick = j if before(a[j], a[k]) else k if before(a[i], a[k]) else i
    else:
        pick = i if before(a[i], a[k]) else k if before(a[j], a[k]) else j
    a[result], a[pick] = a[pick], a[result]


def partition(a: list, first: int, last: int, pivot: int) -> int:
    """libstdc++'s __unguarded_partition of a[first:last] around a[pivot]."""
    while True:
        while before(a[first], a[pivot]):
            first += 1
        last -= 1
        while before(a[pivot], a[last]):
            last -= 1
        if first >= last:
            return first
        a[first], a[last] = a[last], a[first]
        first += 1


def linear_insert(a: list, last: int) -> None:
    """libstdc++'s __unguarded_linear_insert: a[last] moved down past the items it goes before."""
    value = a[last]
    while before(value, a[last - 1]):
        a[last] = a[last - 1]
        last -= 1
    a[last] = value


def insertion_sort(a: list, first: int, last: int) -> None:
    """libstdc++'s __insertion_sort of a[first:last]."""
    for i in range(first + 1, last):
        if before(a[i], a[first]):
            a[first + 1 : i + 1], a[first] = a[first:i], a[i]
        else:
            linear_insert(a, i)
