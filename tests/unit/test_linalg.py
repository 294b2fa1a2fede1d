"""pinv_svd: the Moore-Penrose conditions and agreement with torch.linalg.pinv, in every orientation."""

import pytest
import torch

from latent_atlas.linalg import pinv_svd


def _low_rank(rows: int, columns: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rows * 100 + columns)
    left = torch.randn(rows, rank, generator=generator, dtype=torch.float64)
    return left @ torch.randn(rank, columns, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize(("rows", "columns", "rank"), [(8, 40, 8), (40, 8, 8), (12, 12, 12), (9, 30, 4), (30, 9, 4)])
def test_pinv_svd_is_the_moore_penrose_inverse(rows, columns, rank):
    matrix = _low_rank(rows, columns, rank)
    result = pinv_svd(matrix)
    inverse = result.pseudo_inverse
    assert inverse.shape == (columns, rows) and result.rank == rank
    torch.testing.assert_close(inverse, torch.linalg.pinv(matrix, rtol=1e-6), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(matrix @ inverse @ matrix, matrix, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(inverse @ matrix @ inverse, inverse, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(matrix @ inverse, (matrix @ inverse).T, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(inverse @ matrix, (inverse @ matrix).T, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(result.singular_values[:rank], torch.linalg.svdvals(matrix)[:rank])
