"""TokenCut: one object per image by a normalized cut on patch features.

Nodes are patches; A_ij = 1 if cos(f_i, f_j) >= tau else eps.  The generalized
problem (D - A) x = lambda D x is solved through the symmetric normalized
matrix D^-1/2 A D^-1/2 (same eigenvectors after rescaling by D^-1/2), which is
symmetric, so a standard or sparse symmetric solver applies.

A graph on the CPU is stored as its lower triangle (diagonal included; the
upper triangle is 0, `affinity`) and every CPU solve reads only that half
(BLAS symv, eigh's lower triangle): at 3600 nodes each pass over the graph
is memory traffic, and half the matrix is half the time.  A whole symmetric
matrix is read the same way.  On a GPU a graph is the whole matrix
(`affinity_torch`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from scipy import ndimage
from scipy.linalg.blas import ssymv, ssyrk
from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh

from mirage.data import schema
from mirage.data.images import decode_png, encode_mask, mask_to_box
from mirage.data.params import Discover, Features
from mirage.data.store import Partial, interruption_point
from mirage.models.devices import compute_dtype, resolve_device
from mirage.models.encoders import Encoder, load_encoder
from mirage.models.fingerprint import encoder_spec, model_fingerprint

BLOCK_ROWS = 256  # rows of a graph thresholded at a time (a 256 x N strip: 3.6 MB at 3600 nodes)
DENSE_MAX_NODES = 400  # up to here a dense eigh is faster than ARPACK (0.13 s vs 0.04 s at 1024 nodes)


@dataclass(frozen=True)
class Cut:
    patch_mask: np.ndarray  # bool gh x gw
    eigenvalue: float       # second-smallest generalized eigenvalue (0..1, lower = cleaner cut)


def affinity(features: np.ndarray, tau: float, eps: float) -> np.ndarray:
    """N x C features -> N x N graph: 1 where cosine similarity >= tau, else
    eps; its lower triangle only (the upper is 0: `mirrored` gives the whole)."""
    f = features.astype(np.float32)  # float32 similarities: 2x faster, thresholding is unaffected
    f /= np.linalg.norm(f, axis=1, keepdims=True).clip(1e-12)
    # One triangle of f f^T by BLAS syrk (half a matmul's work; torch's f @ f.T is a full matmul, 1.7x
    # slower on an AVX2 EPYC), thresholded in blocks of rows; NumPy's f @ f.T calls the same syrk (the
    # same bytes) and then mirrors it in a cache-unfriendly loop, a third of the graph's time at 3600
    # nodes, which the solvers do not need.  1.0 where similar, 0.0 else, then eps for the 0.0s.
    lower = ssyrk(1.0, f.T, trans=1).T  # C-ordered: the lower triangle set, the rest 0
    similar = torch.from_numpy(lower)
    for i0 in range(0, len(f), BLOCK_ROWS):
        i1 = min(i0 + BLOCK_ROWS, len(f))
        similar[i0:i1, :i0].ge_(tau).clamp_min_(eps)
        similar[i0:i1, i0:i1].ge_(tau).clamp_min_(eps).tril_()
    return lower


def mirrored(graph: np.ndarray) -> np.ndarray:
    """The whole symmetric matrix of a graph stored as its lower triangle (or whole)."""
    lower = np.tril(graph)
    return lower + np.tril(lower, -1).T


def symmetric_times(graph: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A x for the float32 graph A (its lower triangle read) and a float32 vector x (BLAS ssymv)."""
    return ssymv(1.0, graph.T, x)  # graph.T: Fortran-ordered, its upper triangle is the graph's lower


@dataclass(frozen=True)
class Restriction:
    """A graph's nodes `nodes` (their indices, ascending; None: all of them) as
    the system to solve, without copying the sub-matrix out: `fiedler` and
    `fiedler_batch` mask the other nodes (a copy of a 3600-node graph cost
    more than its Lanczos solve)."""
    graph: np.ndarray | torch.Tensor
    nodes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.graph) if self.nodes is None else len(self.nodes)

    def copied(self) -> np.ndarray | torch.Tensor:
        return self.graph if self.nodes is None else _sub(self.graph, self.nodes)

    def of(self, x: np.ndarray) -> np.ndarray:
        """The system's entries of a vector over the graph's nodes."""
        return x[: len(self.graph)] if self.nodes is None else x[self.nodes]


def fiedler(graph: np.ndarray | Restriction) -> tuple[np.ndarray, float]:
    """The generalized Fiedler vector x of (D - A) x = lambda D x, with a
    deterministic sign (its largest-magnitude entry positive), and lambda;
    of a Restriction: the sub-graph's, over its nodes."""
    system = graph if isinstance(graph, Restriction) else Restriction(graph)
    if len(system) <= DENSE_MAX_NODES:
        mu, v, d_inv_sqrt = _dense_fiedler(system.copied())
        return _signed(v * d_inv_sqrt, mu)
    # Lanczos (ARPACK) on D^-1/2 A D^-1/2 without forming it: each matvec is
    # s * (A @ (s * x)) on the float32 graph's lower triangle, so the only pass
    # over the matrix is the matvec itself (memory traffic is the cost at 3600 nodes).
    # Its top eigenpair is known exactly (sqrt(d), 1) and deflated implicitly,
    # so ARPACK is asked for one vector with a small Krylov space.  Nodes outside
    # the system have s = 0: the operator is the sub-graph's, padded with zeros.
    a = system.graph if system.graph.dtype == np.float32 else system.graph.astype(np.float32)
    kept = np.zeros(len(a), dtype=np.float32)
    kept[slice(None) if system.nodes is None else system.nodes] = 1.0
    d = symmetric_times(a, kept).astype(np.float64)  # degrees within the system
    inside = kept > 0
    d_inv_sqrt = np.where(inside, 1.0 / np.sqrt(d), 0.0)
    s32 = d_inv_sqrt.astype(np.float32)
    root = np.where(inside, np.sqrt(d), 0.0)
    top = (root / np.linalg.norm(root)).astype(np.float32)

    def matvec(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32).ravel()
        return s32 * symmetric_times(a, s32 * x) - top * (top @ x)

    op = LinearOperator((len(a), len(a)), matvec=matvec, dtype=np.float32)
    try:
        values, vectors = eigsh(op, k=1, which="LA", v0=kept, tol=1e-6, ncv=ARPACK_NCV)
    except ArpackError:  # e.g. a graph of equal degrees: the deflated start vector is zero
        mu, v, d_inv_sqrt = _dense_fiedler(system.copied())
        return _signed(v * d_inv_sqrt, mu)
    return _signed(system.of(vectors[:, 0].astype(np.float64) * d_inv_sqrt), float(values[0]))


def _dense_fiedler(graph: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(mu, v, D^-1/2): the second-largest eigenpair of D^-1/2 A D^-1/2, dense float64."""
    graph = mirrored(graph)
    d = graph.sum(1, dtype=np.float64)
    d_inv_sqrt = 1.0 / np.sqrt(d)
    normalized = graph.astype(np.float64) * d_inv_sqrt[:, None] * d_inv_sqrt[None, :]
    values, vectors = np.linalg.eigh(normalized)
    return float(values[-2]), vectors[:, -2], d_inv_sqrt


def affinity_torch(features: np.ndarray, tau: float, eps: float, device: torch.device) -> torch.Tensor:
    """`affinity` as a torch tensor on `device` (float32, the same thresholding;
    on the CPU it is `affinity`, the lower triangle; on a GPU the whole matrix)."""
    if device.type == "cpu":
        return torch.from_numpy(affinity(features, tau, eps))
    f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    f = f / torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min(1e-12)
    return (f @ f.T).ge_(tau).clamp_min_(eps)


ARPACK_NCV = 8  # ARPACK's Lanczos vectors: 5 saves a quarter on clean graphs but is 4x slower on noisy ones
LANCZOS_STEPS = 40  # Krylov vectors per restart of the batched solver (it stops early once all converged)
LANCZOS_RESTARTS = 50
LANCZOS_TOL = 1e-5  # residual |M u - mu u| of the unit Ritz vector u


def fiedler_batch(systems: list) -> list[tuple[np.ndarray, float]]:
    """`fiedler` of several graphs (square float32 tensors on one device, of
    any sizes, or Restrictions of them) solved together.  Up to
    DENSE_MAX_NODES nodes: one batched dense eigh (float64, padded to one
    B x N x N batch whose padding's eigenvalues are below every real one).
    Larger: batched Lanczos (one vector-matrix product a graph a step, no
    graph copied) on the deflated D^-1/2 A D^-1/2 (its known top pair
    (1, sqrt(d)) projected out, as `fiedler` does), the nodes outside a
    graph's system masked out: s = 0 there, so its problem is exactly the
    sub-graph's.  Graphs of different sizes (merged ones) are padded into one
    batch, whose padding is masked the same way."""
    if not systems:
        return []
    systems = [g if isinstance(g, Restriction) else Restriction(g) for g in systems]
    device = systems[0].graph.device
    sizes = [len(g) for g in systems]
    if max(sizes) <= DENSE_MAX_NODES:
        return _dense_batch([g.copied() for g in systems], sizes, device)
    full = [g.graph for g in systems]
    n = max(len(g) for g in full)
    if any(len(g) != n for g in full):  # merged graphs of several sizes: one zero-padded batch (small graphs)
        full = list(_padded(full, n, device))
    kept = torch.zeros(len(full), n, dtype=torch.bool, device=device)
    for i, g in enumerate(systems):
        if g.nodes is None:
            kept[i, : len(g.graph)] = True
        else:
            kept[i, torch.from_numpy(g.nodes).to(device)] = True
    d = _times(full, kept.float()).double()  # degrees within the system
    s = torch.where(kept, d.clamp_min(1e-300).rsqrt(), 0.0)
    mu, v, unconverged = _lanczos_second(full, s, d, kept)
    x = (v.double() * s).cpu().numpy()
    out = [_signed(g.of(x[i]), mu[i]) for i, g in enumerate(systems)]
    for i in unconverged:  # still above LANCZOS_TOL after every restart: the one-image solve instead
        out[i] = fiedler(systems[i].copied().cpu().numpy())
    return out


def _padded(graphs: list[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """Graphs of up to n nodes as one zero-padded B x n x n batch."""
    a = torch.zeros(len(graphs), n, n, dtype=torch.float32, device=device)
    for i, g in enumerate(graphs):
        a[i, : len(g), : len(g)] = g
    return a


def _signed(x: np.ndarray, mu) -> tuple[np.ndarray, float]:
    """(x with its largest-magnitude entry positive, the generalized eigenvalue 1 - mu)."""
    return (-x if x[np.argmax(np.abs(x))] < 0 else x), float(1.0 - mu)


def _dense_batch(graphs: list[torch.Tensor], sizes: list[int], device: torch.device) -> list[tuple[np.ndarray, float]]:
    """Small graphs: one batched dense eigh of the zero-padded batch."""
    n = max(sizes)
    a = torch.stack(graphs) if all(size == n for size in sizes) else _padded(graphs, n, device)
    a = torch.tril(a) + torch.tril(a, -1).transpose(1, 2)  # the whole matrices (a CPU graph is its lower triangle)
    real = torch.arange(n, device=device)[None, :] < torch.tensor(sizes, device=device)[:, None]
    d = a.sum(-1).double()  # float32 sums, as `fiedler` (a float64 reduction is 13x slower on CPU)
    s = torch.where(real, d.clamp_min(1e-300).rsqrt(), 0.0)
    normalized = a.double() * s[:, :, None] * s[:, None, :]
    normalized.diagonal(dim1=1, dim2=2).masked_fill_(~real, -2.0)  # padding: below every real eigenvalue
    values, vectors = torch.linalg.eigh(normalized)
    x = (vectors[:, :, -2] * s).cpu().numpy()
    return [_signed(x[i, :size], values[i, -2]) for i, size in enumerate(sizes)]


def _lanczos_second(graphs: list[torch.Tensor], s: torch.Tensor, d: torch.Tensor,
                    real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(mu, v) per graph (N x N each, `real`: the nodes of its system): the
    largest eigenpair of the deflated normalized matrix, by Lanczos
    restarted from its Ritz vector until the residual is below LANCZOS_TOL
    (ARPACK's start: ones, deflated); and the graphs still above it after
    LANCZOS_RESTARTS."""
    b, n = s.shape
    s32 = s.float()
    top = torch.where(real, d.clamp_min(0).sqrt(), 0.0)
    top = (top / torch.linalg.vector_norm(top, dim=1, keepdim=True)).float()
    start = real.float()
    start = start - top * (top * start).sum(1, keepdim=True)
    flat = torch.linalg.vector_norm(start, dim=1) < 1e-3  # equal degrees: ones is the top vector itself
    if flat.any():  # a fixed draw instead, the same on every run
        noise = torch.rand(b, n, generator=torch.Generator().manual_seed(0)).to(s.device) * real
        start[flat] = (noise - top * (top * noise).sum(1, keepdim=True))[flat]
    mu = torch.zeros(b, dtype=torch.float64, device=s.device)
    v = start / torch.linalg.vector_norm(start, dim=1, keepdim=True)
    todo = torch.arange(b, device=s.device)
    for _ in range(LANCZOS_RESTARTS):
        sub = [graphs[j] for j in todo.tolist()]  # the unconverged graphs only (views: nothing copied)
        sub_s, sub_t = s32[todo], top[todo]

        def matvec(x: torch.Tensor) -> torch.Tensor:
            y = sub_s * _times(sub, sub_s * x)
            return y - sub_t * (sub_t * x).sum(1, keepdim=True)

        theta, u, residual = _lanczos(matvec, v[todo], LANCZOS_STEPS)
        mu[todo], v[todo] = theta, u
        todo = todo[residual > LANCZOS_TOL]
        if not len(todo):
            break
    return mu, v, todo.tolist()


def _times(graphs: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A_k x_k for each row k of x (B x N) and its graph A_k (N x N): on the
    CPU its lower triangle (ssymv: 2.5x torch's x^T A at 3600 nodes, reading
    half the bytes), on a GPU the whole matrix."""
    if x.device.type == "cpu":
        rows = x.numpy()
        return torch.from_numpy(np.stack([symmetric_times(g.numpy(), rows[k]) for k, g in enumerate(graphs)]))
    return torch.stack([x[k] @ g for k, g in enumerate(graphs)])  # x^T A = (A x)^T


def _lanczos(matvec, q: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to `steps` Lanczos steps of `matvec` from unit vectors q (k x n, fully
    reorthogonalized): the largest Ritz value, its unit Ritz vector and its
    residual norm, per row.  A row whose Krylov space ends early (an
    invariant subspace: few distinct patches) stops there, with residual 0."""
    k, n = q.shape
    basis = q.new_zeros(k, steps, n)
    alpha = torch.full((k, steps), -4.0, dtype=torch.float64, device=q.device)  # ended: below every eigenvalue
    beta = torch.zeros(k, steps, dtype=torch.float64, device=q.device)
    alive = torch.ones(k, dtype=torch.bool, device=q.device)
    for j in range(steps):
        basis[:, j] = q
        w = matvec(q)
        alpha[:, j] = torch.where(alive, (w * q).sum(1).double(), -4.0)
        for _ in range(2):  # twice is enough (Kahan): orthogonal to float32 precision
            w = _orthogonal(w, basis[:, : j + 1])
        norm = torch.linalg.vector_norm(w, dim=1)
        alive = alive & (norm > 1e-5)
        beta[:, j] = torch.where(alive, norm.double(), 0.0)
        if j % 4 == 3 and j + 1 < steps:  # every fourth step: stop once every row has converged
            theta, y, residual = _ritz(alpha[:, : j + 1], beta[:, : j + 1])
            if bool((residual <= LANCZOS_TOL).all()):
                return theta, _ritz_vector(y, basis[:, : j + 1]), residual
        q = torch.where(alive[:, None], w / norm.clamp_min(1e-30)[:, None], 0.0)
    theta, y, residual = _ritz(alpha, beta)
    return theta, _ritz_vector(y, basis), residual


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b.  On the CPU by NumPy's matmul: torch's bmm runs on MKL, whose idle
    threads spun against OpenBLAS's ssymv (the batched solve 2x slower on 2 cores)."""
    if a.device.type == "cpu":
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))
    return torch.bmm(a, b)


def _orthogonal(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Each row of w (k x n) minus its projection on its rows of basis (k x j x n, orthonormal)."""
    return w - _bmm(_bmm(basis, w[:, :, None]).transpose(1, 2), basis)[:, 0]


def _ritz(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The largest Ritz value of the Lanczos tridiagonal (alpha, beta), its
    eigenvector y and the residual norm |beta_last y_last|."""
    t = torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1) + torch.diag_embed(beta[:, :-1], -1)
    values, vectors = torch.linalg.eigh(t)
    y = vectors[:, :, -1]
    return values[:, -1], y, (beta[:, -1] * y[:, -1]).abs()


def _ritz_vector(y: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The unit Ritz vector basis^T y, per row."""
    u = _bmm(y.float()[:, None, :], basis)[:, 0]
    return u / torch.linalg.vector_norm(u, dim=1, keepdim=True)


def second_eigenvector(features: np.ndarray, tau: float, eps: float) -> tuple[np.ndarray, float]:
    """features: N x C -> (Fiedler vector, eigenvalue) of TokenCut's graph."""
    return fiedler(affinity(features, tau, eps))


def corners(mask: np.ndarray) -> int:
    return int(mask[0, 0]) + int(mask[0, -1]) + int(mask[-1, 0]) + int(mask[-1, -1])


def foreground(x: np.ndarray, grid: tuple[int, int], nodes: np.ndarray, corner_rule: bool) -> np.ndarray:
    """Bipartition x > mean(x) on the seed's side (seed: largest |x|; x[seed] > 0
    after the sign fix); with `corner_rule`, a side covering >= 3 of the 4 grid
    corners is background (MaskCut's rule).  Returns the seed's 4-connected component.
    `nodes` are the grid indices of x's entries."""
    side = np.zeros(grid[0] * grid[1], dtype=bool)
    side[nodes] = x > x.mean()
    seed = nodes[int(np.argmax(np.abs(x)))]
    if corner_rule and corners(side.reshape(grid)) >= 3:
        side[nodes] = ~side[nodes]
        seed = nodes[int(np.argmin(x))]
    labels, _ = ndimage.label(side.reshape(grid))
    return labels == labels.flat[seed]


class Graph:
    """TokenCut's graph of one image's patches, and the system whose Fiedler
    vector cuts a set of them.  `merged`: patches with identical features (the tokens Token
    Merging made one, mapped back to the grid: features.tome_r) are one node
    weighing as many patches, so the solve runs on the merged graph, T' nodes
    instead of P: W'_ab = s_a s_b w(a, b).  Its eigenproblem is the patch
    graph's restricted to vectors equal on each merged token (which the patch
    graph's Fiedler vector is, identical nodes being interchangeable), so the
    cut is the same and its vector is mapped back to the patches.
    `device`: the graph is a torch tensor there (the batched solver,
    `fiedler_batch`); None: a NumPy array (`fiedler`, one image at a time)."""

    def __init__(self, features: np.ndarray, tau: float, eps: float, merged: bool = False,
                 device: torch.device | None = None):
        if merged:  # rows compared as raw bytes: 20x faster than np.unique(axis=0) at 3600 x 768
            f = np.ascontiguousarray(features)
            rows = f.view(np.dtype((np.void, f.dtype.itemsize * f.shape[1]))).ravel()
            _, first, self.token = np.unique(rows, return_index=True, return_inverse=True)
            features, self.token = f[first], self.token.reshape(-1)
        else:
            self.token = None
        self.graph = affinity(features, tau, eps) if device is None else affinity_torch(features, tau, eps, device)
        self.whole: tuple[np.ndarray, float] | None = None  # the whole graph's solve, kept for the next method

    def nodes(self, patches: np.ndarray) -> int:
        """How many nodes the graph on `patches` has (merged: their distinct tokens)."""
        return len(patches) if self.token is None else len(np.unique(self.token[patches]))

    def system(self, nodes: np.ndarray) -> tuple[np.ndarray | torch.Tensor, np.ndarray | None]:
        """The graph whose Fiedler vector is the cut of patches `nodes`, and the
        map from those patches to its nodes (None: one node a patch)."""
        if self.token is None:
            if len(nodes) == len(self.graph):
                return self.graph, None
            if isinstance(self.graph, torch.Tensor) or len(nodes) > DENSE_MAX_NODES:
                return Restriction(self.graph, nodes), None  # the solver masks the rest
            return _sub(self.graph, nodes), None
        tokens, at, sizes = np.unique(self.token[nodes], return_inverse=True, return_counts=True)
        weights = sizes.astype(np.float32)
        if isinstance(self.graph, torch.Tensor):
            weights = torch.from_numpy(weights).to(self.graph.device)
        return _sub(self.graph, tokens) * weights[:, None] * weights[None, :], at.reshape(-1)


def _sub(graph: np.ndarray | torch.Tensor, nodes: np.ndarray) -> np.ndarray | torch.Tensor:
    """The sub-graph on `nodes`, in ascending order: a lower triangle stays one."""
    if isinstance(graph, torch.Tensor):
        index = torch.from_numpy(nodes).to(graph.device)
        return graph.index_select(0, index).index_select(1, index)
    return np.take(np.take(graph, nodes, 0), nodes, 1)  # graph[np.ix_(nodes, nodes)], 2.4x faster


def solve_each(systems: list[np.ndarray | Restriction]) -> list[tuple[np.ndarray, float]]:
    """The scipy solver: one image's graph at a time (`fiedler`), a stop point before each."""
    out = []
    for graph in systems:
        interruption_point("cut")  # a stopped run (Ctrl-C, a cancel) ends here, not at the end of its batch
        out.append(fiedler(graph))
    return out


def solve_together(systems: list[torch.Tensor]) -> list[tuple[np.ndarray, float]]:
    """The torch solver: every image's graph of this round in one batched solve."""
    interruption_point("cut")
    return fiedler_batch(systems)


def cut_rounds(graphs: list[Graph], grid: tuple[int, int], rounds: int, min_area: float, corner_rule: bool,
               solve, min_nodes: int = 3) -> list[list[Cut]]:
    """Cuts of several images' graphs, round by round: in each, every image
    still cutting is solved (`solve`: `solve_each` or `solve_together`), its
    found patches leave its graph, and a mask covering <= `min_area` of the
    grid is dropped (a negative `min_area` keeps every cut).  An image stops
    when fewer than `min_nodes` nodes are left.  The images share only the
    solver's calls: with `solve_each` each image's cuts are what it alone gets;
    the first round's solve of a graph is kept (Graph.whole) for the next
    method cut on the same graphs (TokenCut's cut is MaskCut's first)."""
    remaining = [np.arange(grid[0] * grid[1]) for _ in graphs]
    cuts: list[list[Cut]] = [[] for _ in graphs]
    active = list(range(len(graphs)))
    for first in [True] + [False] * (rounds - 1):
        active = [i for i in active if graphs[i].nodes(remaining[i]) >= min_nodes]
        if not active:
            break
        systems = {i: graphs[i].system(remaining[i]) for i in active}
        fresh = [i for i in active if not first or graphs[i].whole is None]
        solved = dict(zip(fresh, solve([systems[i][0] for i in fresh])))
        for i in active:
            if first and i in solved:
                graphs[i].whole = solved[i]
            y, value = graphs[i].whole if first else solved[i]
            at = systems[i][1]
            x = y if at is None else y[at]
            mask = foreground(x, grid, remaining[i], corner_rule)
            remaining[i] = remaining[i][~mask.reshape(-1)[remaining[i]]]
            if mask.mean() > min_area:
                cuts[i].append(Cut(patch_mask=mask, eigenvalue=value))
    return cuts


def maskcut(
    features: np.ndarray,
    grid: tuple[int, int],
    tau: float,
    eps: float,
    max_objects: int,
    min_area: float = 0.01,
    merged: bool = False,
) -> list[Cut]:
    """Up to `max_objects` cuts: after each, the found patches leave the graph
    and the rest is cut again, so masks never overlap (MaskCut's IoU > 0.5
    filter matters only after pixel-level refinement, which mirage does not
    do).  A mask covering <= `min_area` of the grid is dropped.  `merged`:
    the cuts run on the merged graph (Graph)."""
    return maskcut_rounds([Graph(features, tau, eps, merged)], grid, max_objects, min_area, solve_each)[0]


def tokencut(features: np.ndarray, grid: tuple[int, int], tau: float, eps: float, merged: bool = False) -> Cut:
    """TokenCut: the single cut of the full graph, the seed's side and component
    (`merged`: on the merged graph, Graph)."""
    return tokencut_rounds([Graph(features, tau, eps, merged)], grid, solve_each)[0][0]


def tokencut_rounds(graphs: list[Graph], grid: tuple[int, int], solve) -> list[list[Cut]]:
    """TokenCut on each graph: one cut of the whole graph, always kept."""
    return cut_rounds(graphs, grid, 1, -1.0, False, solve, min_nodes=1)


def maskcut_rounds(graphs: list[Graph], grid: tuple[int, int], max_objects: int, min_area: float,
                   solve) -> list[list[Cut]]:
    """MaskCut on each graph: up to `max_objects` cuts (the corner rule when several)."""
    return cut_rounds(graphs, grid, max_objects, min_area, max_objects > 1, solve)


def upsample_mask(patch_mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Patch grid mask -> pixel mask (nearest; each patch covers its pixel block)."""
    gh, gw = patch_mask.shape
    rows = (np.arange(height) * gh) // height
    cols = (np.arange(width) * gw) // width
    return patch_mask[rows[:, None], cols[None, :]]


def cut_to_object(cut: Cut, height: int, width: int) -> tuple[np.ndarray, list[float]]:
    """Pixel mask and its (x, y, w, h) box."""
    mask = upsample_mask(cut.patch_mask, height, width)
    return mask, mask_to_box(mask)


def zero_shot(encoder: Encoder, images: np.ndarray, boxes: list[list[float]], prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Class index and probability for the crop of each box (x, y, w, h px).
    images: uint8 H x W x 3 each (any sizes)."""
    crops = []
    for img, (x, y, w, h) in zip(images, boxes):
        x0, y0 = int(x), int(y)
        x1, y1 = max(int(x + w), x0 + 1), max(int(y + h), y0 + 1)
        crop = torch.from_numpy(np.array(img[y0:y1, x0:x1])).permute(2, 0, 1)[None].float()
        size = (encoder.image_size, encoder.image_size)
        crops.append(torch.nn.functional.interpolate(crop, size=size, mode="bilinear", align_corners=False)[0])
    batch = torch.stack(crops).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with torch.inference_mode():
        img_emb, _ = encoder.encode_images(batch, keys=False)
        txt_emb = encoder.encode_text(prompts)
        probs = (encoder.model.logit_scale.exp() * img_emb @ txt_emb.T).softmax(-1).cpu().numpy()
    return probs.argmax(1), probs.max(1)


def graph_key(cfg) -> tuple:
    """What of a Discover section builds the graphs (not the method cutting them)."""
    return cfg.tau, cfg.eps, cfg.on_merged, cfg.solver


def graphs_of(features: list[np.ndarray], cfg, device: torch.device) -> list[Graph]:
    """Each image's graph as `cfg` (a Discover section: its `graph_key`)
    builds it; the methods' cuts (`cut_graphs`) can share them."""
    on = device if cfg.solver == "torch" else None
    return [Graph(f, cfg.tau, cfg.eps, cfg.on_merged, on) for f in features]


def cut_graphs(graphs: list[Graph], grid: tuple[int, int], cfg) -> list[list[Cut]]:
    """The cuts `cfg.method` asks for on each image's graph; `cfg.solver` torch
    solves the images' graphs together, scipy one at a time (the same cuts)."""
    solve = solve_together if cfg.solver == "torch" else solve_each
    if cfg.method == "tokencut":
        return tokencut_rounds(graphs, grid, solve)
    return maskcut_rounds(graphs, grid, cfg.max_objects, cfg.min_area, solve)


def discover_images(features: list[np.ndarray], grid: tuple[int, int], cfg, device: torch.device) -> list[list[Cut]]:
    """The cuts `cfg` (a Discover section) asks for, on each image's N x C
    patch features (`device`: where solver torch runs)."""
    return cut_graphs(graphs_of(features, cfg, device), grid, cfg)


VERSION = 7  # 2: float32 similarities; 3: float32 deflated ARPACK solve; 4: naming device/dtype in keys;
# 5: degenerate cuts dropped, images without an object are failed items; 6: solver torch's graph on the CPU
# is `affinity`'s (NumPy's symmetric product: torch's matmul rounds otherwise, an edge at tau could flip);
# 7: above 400 nodes the solves read the graph's lower triangle (ssymv) and mask a later round's sub-graph
# instead of copying it out (other roundings; up to 400 nodes the same bytes)


def discover_batch(encoder: Encoder, cfg: Discover, grid: tuple[int, int, int], rows: list[dict]) -> pa.Table | Partial:
    """Objects of a batch of images.  An image that cannot be decoded, whose
    patch features are not finite, or where no object is found (every cut
    empty or the whole image) is a failed item: left out, with its reason."""
    gh, gw, c = grid
    errors: dict[str, tuple[str, str]] = {}
    decoded = {}
    for r in rows:
        try:
            decoded[r["key"]] = decode_png(r["image"])
        except Exception as err:  # noqa: BLE001 - PIL raises several types
            errors[r["key"]] = (r["id"], f"cannot be decoded: {type(err).__name__}: {err}")
    found = []  # (row index, box, mask, score)
    todo: dict[str, list[tuple[int, np.ndarray]]] = {}  # method -> (row index, patch features)
    for i, r in enumerate(rows):
        if r["key"] in errors:
            continue
        feats = r["patches"].astype(np.float32).reshape(gh * gw, c)
        if not np.isfinite(feats).all():
            errors[r["key"]] = (r["id"], "non-finite patch features (NaN or inf)")
            continue
        todo.setdefault(r.get("method", cfg.method), []).append((i, feats))
    for method, items in todo.items():
        cuts = discover_images([f for _, f in items], (gh, gw), cfg.model_copy(update={"method": method}), encoder.device)
        for (i, _), image_cuts in zip(items, cuts):
            h, w = decoded[rows[i]["key"]].shape[:2]
            kept = 0
            for cut in image_cuts:
                mask, box = cut_to_object(cut, h, w)
                if box[2] <= 0 or box[3] <= 0 or mask.all():  # degenerate: nothing, or the whole image
                    continue
                found.append((i, box, encode_mask(mask), 1.0 - cut.eigenvalue))
                kept += 1
            if not kept:
                errors[rows[i]["key"]] = (rows[i]["id"], "no object found (every cut empty or the whole image)")
    found.sort(key=lambda f: f[0])  # in row order, whatever the methods' order
    prompts = [cfg.prompt_template.format(name) for name in cfg.classes]
    if found and encoder.has_text:
        images = [decoded[rows[f[0]]["key"]] for f in found]  # own sizes: crops are resized
        index, label_scores = zero_shot(encoder, images, [f[1] for f in found], prompts)
        labels = [cfg.classes[int(i)] for i in index]
    else:  # an image-only encoder (a timm ViT) names nothing: label "" with score 0
        labels, label_scores = [""] * len(found), [0.0] * len(found)
    objects: list[list[dict]] = [[] for _ in rows]
    for (i, box, mask, score), lab, ls in zip(found, labels, label_scores):
        objects[i].append({"box": box, "mask": mask, "score": score, "label": lab, "label_score": float(ls)})
    out = [{"key": r["key"], "image_id": r["id"], "prompt_class": r["class_name"], "objects": o}
           for r, o in zip(rows, objects) if r["key"] not in errors]
    table = pa.Table.from_pylist(out, schema=schema.OBJECTS)
    return Partial(table, errors) if errors else table


def coco_detections(rows: list[dict], images: list[dict], classes: tuple[str, ...]) -> dict:
    """The discovered objects as a COCO detection file's content (boxes x, y, w, h px)."""
    objects = [{**o, "image_id": r["image_id"]} for r in rows for o in r["objects"]]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(classes)]
    if any(o["label"] not in classes for o in objects):  # unnamed (an image-only encoder)
        cats.append({"id": len(classes) + 1, "name": "object"})
    coco = {
        "images": [{"id": i, "file_name": im["id"], "width": im["width"], "height": im["height"]} for i, im in enumerate(images)],
        "categories": cats,
        "annotations": [],
    }
    index = {im["id"]: i for i, im in enumerate(images)}
    for n, o in enumerate(objects):
        x, y, w, h = o["box"]
        coco["annotations"].append({
            "id": n + 1, "image_id": index[o["image_id"]], "category_id": classes.index(o["label"]) + 1 if o["label"] in classes else len(classes) + 1,
            "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "score": o["score"],
            "segmentation": {"size": [images[index[o["image_id"]]]["height"], images[index[o["image_id"]]]["width"]], "counts": o["mask"]},
        })
    return coco


@dataclass(frozen=True)
class DiscoverJob:
    """Cuts and zero-shot names, wherever they run (mirage/run/runner.py): the
    encoder (for naming) is loaded once per process; a batch is rows with
    their patches and image."""

    cfg: Discover
    fcfg: Features
    grid: tuple[int, int, int] = (0, 0, 0)

    def load_key(self) -> tuple:
        return ("discover", self.fcfg.encoder, self.fcfg.device, self.fcfg.dtype)

    def load(self) -> Encoder:
        return load_encoder(encoder_spec(self.fcfg.encoder), resolve_device(self.fcfg.device), self.fcfg.dtype)

    def describe(self, encoder: Encoder) -> dict:
        return {"model": model_fingerprint(encoder_spec(self.fcfg.encoder)), "has_text": encoder.has_text,
                "computed_on": (encoder.device.type, compute_dtype(self.fcfg.dtype, encoder.device))}

    def prepare(self, encoder: Encoder, rows: list[dict]) -> list[dict]:
        return rows

    def compute(self, encoder: Encoder, rows: list[dict]) -> pa.Table:
        return discover_batch(encoder, self.cfg, self.grid, rows)


BATCH = 32  # images per discover batch: 10 for the 300 toy images, an even split over Dask workers
