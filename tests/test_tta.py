"""TTA math against hand-worked cases (DESIGN section 1)."""
import numpy as np
import pytest
import torch

from pipeline.targets.tta import denoise, farthest_point_sample, max_shifts, recover, render_views, sample_views, view_rng


def test_max_shifts_round_per_axis():
    assert max_shifts((37, 37), 0.15) == (6, 6)  # round(5.55)
    assert max_shifts((16, 24), 0.15) == (2, 4)  # round(2.4), round(3.6)
    assert max_shifts((4, 4), 0.0) == (0, 0)


@pytest.mark.parametrize("seed", range(5))
def test_offsets_in_range_view0_identity_never_flipped(seed):
    offsets, flips = sample_views(view_rng(seed, 123), 10, (2, 3), flip=True)
    assert offsets.shape == (10, 2) and flips.shape == (10,)
    assert tuple(offsets[0]) == (0, 0) and not flips[0]
    assert np.all(np.abs(offsets[:, 0]) <= 2) and np.all(np.abs(offsets[:, 1]) <= 3)


def test_fps_from_a_random_candidate_keeps_view0_the_identity():
    """The reference's start: FPS from a random candidate, whose slot then becomes (0, 0)."""
    for i in range(20):
        offsets, flips = sample_views(view_rng(0, i), 10, (3, 3), True, fps_start="random")
        assert tuple(offsets[0]) == (0, 0) and not flips[0] and len({tuple(o) for o in offsets[1:]}) == 9
        rng = view_rng(0, i)  # by hand: the same draws, the same greedy choice from that candidate
        cands = np.stack([rng.integers(-3, 4, size=100), rng.integers(-3, 4, size=100)], axis=1)
        start = cands[rng.integers(100)]
        assert np.array_equal(offsets[1:], farthest_point_sample(cands, 10, first=start)[1:])
    origin = [sample_views(view_rng(0, i), 10, (3, 3), True)[0] for i in range(20)]
    random = [sample_views(view_rng(0, i), 10, (3, 3), True, fps_start="random")[0] for i in range(20)]
    assert any(not np.array_equal(a, b) for a, b in zip(origin, random))


def test_no_flip_when_disabled():
    _, flips = sample_views(view_rng(0, 0), 10, (2, 2), flip=False)
    assert not flips.any()


def test_fps_hand_worked():
    # From (0,0): farthest is (3,4) (dist 5); then (-3,0) is 3 from origin, 7.6 from (3,4) -> min 3;
    # (1,1) has min 1.41; (0,4) has min 3 (tie with (-3,0), earlier index wins).
    cands = np.array([[1, 1], [3, 4], [-3, 0], [0, 4]])
    assert farthest_point_sample(cands, 3).tolist() == [[0, 0], [3, 4], [-3, 0]]


def test_fps_spreads_better_than_first_k():
    rng = np.random.default_rng(0)
    cands = rng.integers(-5, 6, size=(100, 2))

    def min_pairwise(points):
        d = np.linalg.norm(points[:, None] - points[None], axis=-1)
        return d[np.triu_indices(len(points), 1)].min()

    picked = farthest_point_sample(cands, 6)
    assert min_pairwise(picked) >= 4.0  # 6 points in an 11x11 square, greedily spread
    assert min_pairwise(picked) > min_pairwise(np.vstack([[0, 0], cands[:5]]))


def test_views_depend_only_on_seed_index_variant():
    a = sample_views(view_rng(7, 42, 1), 10, (3, 3), True)
    b = sample_views(view_rng(7, 42, 1), 10, (3, 3), True)
    c = sample_views(view_rng(7, 43, 1), 10, (3, 3), True)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not (np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1]))


def test_render_shift_and_flip_by_hand():
    # 1 channel, 2x3 patches of size 1: pixel value = 10*row + col.
    img = torch.tensor([[[0.0, 1, 2], [10, 11, 12]]])[None]  # (1, 1, 2, 3)
    fill = torch.tensor([-1.0])
    offsets = np.array([[[0, 0], [1, 0], [0, -1], [0, 1]]])
    flips = np.array([[False, False, False, True]])
    views = render_views(img, offsets, flips, (1, 1), fill)[0, :, 0]
    assert views[0].tolist() == [[0, 1, 2], [10, 11, 12]]
    assert views[1].tolist() == [[-1, -1, -1], [0, 1, 2]]  # moved down one patch, white above
    assert views[2].tolist() == [[1, 2, -1], [11, 12, -1]]  # moved left
    # moved right, then flipped: [[-1, 0, 1], [-1, 10, 11]] mirrored
    assert views[3].tolist() == [[1, 0, -1], [11, 10, -1]]


def test_recover_maps_tokens_home_and_drops_infill():
    # tokens of view = the original patch id each view position shows (-1 for infill)
    grid = torch.arange(6.0).view(2, 3)
    offsets = np.array([[[0, 0], [1, 0], [0, 1], [0, -1]]])
    flips = np.array([[False, False, True, False]])
    img = grid[None, None]  # treat the grid as a 1-channel image with 1x1 patches
    views = render_views(img, offsets, flips, (1, 1), torch.tensor([-100.0]))  # (1, 4, 1, 2, 3)
    tokens = views[:, :, 0, :, :, None]  # (B, V, gh, gw, D=1)
    mean, seen = recover(tokens, offsets, flips)
    # every recovered token is the patch's own id: nothing moved to the wrong place and the
    # infill (-100) never entered an average
    assert torch.equal(mean[0, :, :, 0], grid)
    # coverage by hand: view 0 sees all; the shift down sees only row 0; the shift right
    # (flipped or not) sees columns 0-1; the shift left sees columns 1-2
    assert seen[0].tolist() == [[3, 4, 3], [2, 3, 2]]
    assert (seen >= 1).all()


def test_equivariant_teacher_gives_its_own_output():
    """The mean colour of each patch cannot change under whole-patch shifts and flips, so
    the denoised target equals the plain output."""
    torch.manual_seed(0)
    patch = (4, 4)
    images = torch.randn(3, 3, 16, 24)
    fill = torch.tensor([2.0, 2.0, 2.0])

    def patch_means(x):
        n, c, h, w = x.shape
        return x.view(n, c, h // 4, 4, w // 4, 4).mean(dim=(3, 5)).permute(0, 2, 3, 1)

    rngs = [view_rng(0, i) for i in range(3)]
    views = [sample_views(r, 8, max_shifts((4, 6), 0.34), True) for r in rngs]
    offsets = np.stack([v[0] for v in views])
    flips = np.stack([v[1] for v in views])
    target = denoise(patch_means, images, offsets, flips, patch, fill)
    assert torch.allclose(target, patch_means(images), atol=1e-6)
    assert flips.any() and (offsets != 0).any()  # the case is not trivial


def test_non_equivariant_teacher_is_averaged():
    """A teacher that adds a fixed pattern per view position: the pattern is averaged out
    over views, so the target differs from the plain output in a known way."""
    patch = (1, 1)
    image = torch.zeros(1, 1, 1, 2)
    bias = torch.tensor([[0.0, 10.0]])  # position-dependent 'artifact'

    def teacher(x):
        return (x[:, 0] + bias)[..., None]  # (N, 1, 2, 1)

    offsets = np.array([[[0, 0], [0, 1]]])
    flips = np.array([[False, False]])
    target = denoise(teacher, image, offsets, flips, patch, torch.tensor([5.0]))
    # patch 0 is seen at position 0 (bias 0) and, shifted right, at position 1 (bias 10)
    # patch 1 is seen only at position 1 in view 0 (its shifted copy fell off the image)
    assert target[0, 0, :, 0].tolist() == [5.0, 10.0]


# The loop-per-view functions the vectorised ones replaced, kept as their specification.
def _slices(shift: int, size: int) -> tuple[slice, slice]:
    return slice(max(shift, 0), size + min(shift, 0)), slice(max(-shift, 0), size - max(shift, 0))


def _render_views_by_loop(images, offsets, flips, patch, fill):
    B, C, H, W = images.shape
    V = offsets.shape[1]
    views = fill.to(images).view(1, 1, C, 1, 1).expand(B, V, C, H, W).clone()
    for b in range(B):
        for v in range(V):
            dy, dx = int(offsets[b, v, 0]) * patch[0], int(offsets[b, v, 1]) * patch[1]
            (ry, sy), (rx, sx) = _slices(dy, H), _slices(dx, W)
            views[b, v, :, ry, rx] = images[b, :, sy, sx]
            if flips[b, v]:
                views[b, v] = views[b, v].flip(-1)
    return views


def _recover_by_loop(tokens, offsets, flips):
    B, V, gh, gw, D = tokens.shape
    total = torch.zeros(B, gh, gw, D)
    seen = torch.zeros(B, gh, gw)
    for b in range(B):
        for v in range(V):
            t = tokens[b, v].float()
            if flips[b, v]:
                t = t.flip(1)
            dy, dx = int(offsets[b, v, 0]), int(offsets[b, v, 1])
            (vy, oy), (vx, ox) = _slices(dy, gh), _slices(dx, gw)
            total[b, oy, ox] += t[vy, vx]
            seen[b, oy, ox] += 1
    return total / seen.clamp(min=1).unsqueeze(-1), seen


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_views_and_recovery_equal_the_loop_per_view(seed):
    """One gather for all views and one for the recovery give the loop's views bit for bit and
    its targets within float32 rounding (only the summation order over views may differ), on
    random shifts up to the whole grid (views that are all infill included), flips, a
    non-square grid and patch."""
    rng = np.random.default_rng(seed)
    B, V, patch, grid, C, D = 3, 7, (3, 2), (4, 5), 3, 6
    offsets = np.stack([rng.integers(-grid[0], grid[0] + 1, (B, V)), rng.integers(-grid[1], grid[1] + 1, (B, V))], -1)
    flips = rng.random((B, V)) < 0.5
    images = torch.randn(B, C, grid[0] * patch[0], grid[1] * patch[1])
    fill = torch.tensor([0.5, -1.0, 2.0])
    assert torch.equal(render_views(images, offsets, flips, patch, fill), _render_views_by_loop(images, offsets, flips, patch, fill))
    tokens = torch.randn(B, V, *grid, D)
    (mean, seen), (want_mean, want_seen) = recover(tokens, offsets, flips), _recover_by_loop(tokens, offsets, flips)
    assert torch.equal(seen, want_seen)
    torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=1e-6)
