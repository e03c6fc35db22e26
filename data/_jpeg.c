/* Decode only the rectangle of a JPEG that a RandomResizedCrop keeps (libjpeg-turbo's partial decode).
 *
 *   size(data)                                  -> (height, width), or None: not a JPEG this module decodes
 *   crop(data, top, left, height, width, denom) -> bytearray of (height, width, 3) RGB: that rectangle
 *                                                  of the image decoded at 1/denom scale (in its pixels),
 *                                                  or None: a libjpeg warning or error, or a rectangle
 *                                                  outside the image (the caller then decodes the whole
 *                                                  file its usual way)
 *
 * Rows above the rectangle are skipped (jpeg_skip_scanlines: entropy-decoded, no IDCT, no upsampling, no
 * color conversion), rows below it are never read, and columns outside it are not transformed
 * (jpeg_crop_scanline). At denom 1 the pixels are those of a full decode cropped afterwards: the columns
 * asked of libjpeg reach one pixel beyond the rectangle on each side where the image has one, so chroma
 * upsampling at the rectangle's left and right edges sees the same neighbours as in the full image
 * (without that margin, tests/data/test_jpeg.py finds differing pixels there). At denom 2, 4 or 8 the
 * IDCT itself scales the image down (libjpeg's scaled IDCT: ceil(height / denom) x ceil(width / denom)).
 *
 * Only baseline or progressive JPEGs in YCbCr, grayscale or RGB are taken (CMYK and YCCK are not: None);
 * a file with anything libjpeg warns about (truncated data, a corrupt segment) gives None too, so such
 * files keep the caller's behaviour exactly. The GIL is released while decoding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
} error_mgr;

static void on_error(j_common_ptr cinfo) {
    longjmp(((error_mgr *)cinfo->err)->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) /* a warning: corrupt or truncated data. Not decoded here: the caller's decoder says what it is */
        longjmp(((error_mgr *)cinfo->err)->jump, 1);
}

static void quiet(j_common_ptr cinfo) { (void)cinfo; }

static int open_header(struct jpeg_decompress_struct *cinfo, const unsigned char *data, size_t size) {
    if (size < 3 || data[0] != 0xFF || data[1] != 0xD8 || data[2] != 0xFF)
        return 0;
    jpeg_mem_src(cinfo, data, (unsigned long)size);
    if (jpeg_read_header(cinfo, TRUE) != JPEG_HEADER_OK)
        return 0;
    J_COLOR_SPACE cs = cinfo->jpeg_color_space;
    return cs == JCS_YCbCr || cs == JCS_GRAYSCALE || cs == JCS_RGB;
}

static void init(struct jpeg_decompress_struct *cinfo, error_mgr *err) {
    cinfo->err = jpeg_std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_message;
    err->pub.output_message = quiet;
    jpeg_create_decompress(cinfo);
}

static PyObject *size(PyObject *self, PyObject *args) {
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "y*", &buf))
        return NULL;
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    volatile int ok = 0;
    init(&cinfo, &err);
    if (setjmp(err.jump) == 0)
        ok = open_header(&cinfo, buf.buf, (size_t)buf.len);
    JDIMENSION h = cinfo.image_height, w = cinfo.image_width;
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&buf);
    if (!ok || h == 0 || w == 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(II)", h, w);
}

/* Decodes rows [top, bottom) and columns [left, right) of the (scaled) image into out (RGB, packed);
 * 0 on any libjpeg warning or error. */
static int decode_plain(const unsigned char *data, size_t size, int denom, JDIMENSION top, JDIMENSION left,
                       JDIMENSION bottom, JDIMENSION right, unsigned char *out) {
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    unsigned char *volatile row = NULL;
    volatile int ok = 0;
    init(&cinfo, &err);
    if (setjmp(err.jump) == 0 && open_header(&cinfo, data, size)) {
        cinfo.out_color_space = JCS_RGB;
        cinfo.scale_num = 1;
        cinfo.scale_denom = (unsigned int)denom;
        jpeg_start_decompress(&cinfo);
        if (bottom <= cinfo.output_height && right <= cinfo.output_width && top < bottom && left < right) {
            /* one pixel of margin on each side (where there is one) for the chroma upsampling's neighbours */
            JDIMENSION x0 = left > 0 ? left - 1 : 0;
            JDIMENSION x1 = right < cinfo.output_width ? right + 1 : right;
            JDIMENSION xoff = x0, cw = x1 - x0;
            jpeg_crop_scanline(&cinfo, &xoff, &cw); /* widened to whole iMCU columns */
            row = (unsigned char *)malloc((size_t)cw * 3);
            if (row != NULL) {
                /* (jpeg_skip_scanlines keeps the vertical upsampling's context itself: no margin needed) */
                if (top > 0 && jpeg_skip_scanlines(&cinfo, top) != top)
                    longjmp(err.jump, 1);
                size_t width = (size_t)(right - left) * 3, offset = (size_t)(left - xoff) * 3;
                while (cinfo.output_scanline < bottom) {
                    JSAMPROW rows[1] = {row};
                    JDIMENSION y = cinfo.output_scanline;
                    if (jpeg_read_scanlines(&cinfo, rows, 1) != 1)
                        longjmp(err.jump, 1);
                    memcpy(out + (size_t)(y - top) * width, row + offset, width);
                }
                ok = 1;
            }
        }
    }
    free(row);
    jpeg_destroy_decompress(&cinfo); /* also aborts a decode stopped before its last row */
    return ok;
}

/* ---- files with a restart marker after every MCU (restart() writes them) ------------------------------
 * Each MCU's entropy-coded data then starts on a byte of its own with fresh DC predictions, so the MCUs
 * that cover the rectangle (plus one scaled pixel of margin, for the chroma upsampling) can be copied into
 * a smaller JPEG with the same tables: only they are entropy-decoded, instead of every row down to the
 * rectangle's bottom. */

static unsigned rd16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }

/* Offset of the SOF0/SOF1 marker in the header, or 0. */
static size_t find_sof(const unsigned char *data, size_t end) {
    size_t pos = 2;
    while (pos + 4 <= end) {
        if (data[pos] != 0xFF)
            return 0;
        unsigned char m = data[pos + 1];
        if (m == 0xFF) { pos++; continue; }
        if (m == 0xC0 || m == 0xC1)
            return pos;
        pos += 2 + rd16(data + pos + 2);
    }
    return 0;
}

/* The sub-JPEG of MCU rows [r0, r1) and columns [c0, c1): malloc'd, its size in *out_size; NULL if the
 * entropy-coded data does not hold exactly one segment per MCU. */
static unsigned char *sub_jpeg(const unsigned char *data, size_t size, size_t entropy, size_t sof,
                               JDIMENSION per_row, JDIMENSION rows, JDIMENSION r0, JDIMENSION r1, JDIMENSION c0,
                               JDIMENSION c1, unsigned height, unsigned width, size_t *out_size) {
    size_t n = (size_t)per_row * rows, k = 0;
    size_t *start = (size_t *)malloc((n + 1) * sizeof(size_t));
    if (start == NULL)
        return NULL;
    start[0] = entropy;
    size_t pos = entropy;
    while (pos + 1 < size) { /* segment k ends at the marker after it: RSTn, or EOI after the last */
        const unsigned char *ff = memchr(data + pos, 0xFF, size - pos - 1);
        if (ff == NULL)
            break;
        pos = (size_t)(ff - data);
        unsigned char m = data[pos + 1];
        if (m == 0x00 || m == 0xFF) { pos += m == 0x00 ? 2 : 1; continue; }
        if (m >= 0xD0 && m <= 0xD7 && k + 1 < n) { start[++k] = pos + 2; pos += 2; continue; }
        break; /* EOI (or a marker that ends the scan) */
    }
    unsigned char *out = NULL;
    if (k + 1 == n && pos + 1 < size) {
        size_t last_end = pos, cap = entropy + 4;
        for (JDIMENSION r = r0; r < r1; r++)
            cap += (r + 1 == rows && c1 == per_row ? last_end : start[(size_t)r * per_row + c1] - 2)
                   - start[(size_t)r * per_row + c0] + 2 * (size_t)(c1 - c0);
        out = (unsigned char *)malloc(cap);
        if (out != NULL) {
            memcpy(out, data, entropy);
            out[sof + 5] = (unsigned char)(height >> 8); out[sof + 6] = (unsigned char)height;
            out[sof + 7] = (unsigned char)(width >> 8); out[sof + 8] = (unsigned char)width;
            size_t o = entropy, j = 0;
            for (JDIMENSION r = r0; r < r1; r++)
                for (JDIMENSION c = c0; c < c1; c++) {
                    size_t i = (size_t)r * per_row + c;
                    size_t end = i + 1 < n ? start[i + 1] - 2 : last_end;
                    if (j > 0) { out[o++] = 0xFF; out[o++] = (unsigned char)(0xD0 + ((j - 1) & 7)); }
                    memcpy(out + o, data + start[i], end - start[i]);
                    o += end - start[i];
                    j++;
                }
            out[o++] = 0xFF; out[o++] = 0xD9;
            *out_size = o;
        }
    }
    free(start);
    return out;
}

/* As decode_plain; a file with a restart marker after every MCU decodes only the MCUs around the
 * rectangle (the same pixels: tests/data/test_jpeg.py). */
static int decode_rect(const unsigned char *data, size_t size, int denom, JDIMENSION top, JDIMENSION left,
                       JDIMENSION bottom, JDIMENSION right, unsigned char *out) {
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    unsigned char *volatile sub = NULL;
    volatile size_t sub_size = 0;
    volatile JDIMENSION y0 = 0, x0 = 0;
    init(&cinfo, &err);
    if (setjmp(err.jump) == 0 && open_header(&cinfo, data, size) && cinfo.restart_interval == 1 &&
        !cinfo.progressive_mode && !cinfo.arith_code && cinfo.comps_in_scan == cinfo.num_components) {
        jpeg_calc_output_dimensions(&cinfo); /* max sampling factors */
        JDIMENSION mh = 8 * (JDIMENSION)cinfo.max_v_samp_factor, mw = 8 * (JDIMENSION)cinfo.max_h_samp_factor;
        if (cinfo.num_components == 1)
            mh = mw = 8;
        JDIMENSION H = cinfo.image_height, W = cinfo.image_width, d = (JDIMENSION)denom;
        JDIMENSION per_row = (W + mw - 1) / mw, rows = (H + mh - 1) / mh;
        /* the rectangle in source pixels, one scaled pixel of margin on each side */
        JDIMENSION ys = top > 0 ? (top - 1) * d : 0, xs = left > 0 ? (left - 1) * d : 0;
        JDIMENSION ye = (bottom + 1) * d < H ? (bottom + 1) * d : H, xe = (right + 1) * d < W ? (right + 1) * d : W;
        JDIMENSION r0 = ys / mh, r1 = (ye + mh - 1) / mh, c0 = xs / mw, c1 = (xe + mw - 1) / mw;
        /* libjpeg upsamples chroma plainly, not "fancy", in an image at most 4 pixels wide: a last partial
         * MCU column alone would be one; it takes the column before it along */
        if ((c1 * mw < W ? c1 * mw : W) - c0 * mw < 5 && c0 > 0)
            c0--;
        size_t entropy = (size_t)(cinfo.src->next_input_byte - data), sof = find_sof(data, entropy);
        if (sof > 0 && r1 <= rows && c1 <= per_row && (r0 > 0 || c0 > 0 || r1 < rows || c1 < per_row)) {
            unsigned hs = (unsigned)((r1 * mh < H ? r1 * mh : H) - r0 * mh);
            unsigned ws = (unsigned)((c1 * mw < W ? c1 * mw : W) - c0 * mw);
            size_t n = 0;
            sub = sub_jpeg(data, size, entropy, sof, per_row, rows, r0, r1, c0, c1, hs, ws, &n);
            sub_size = n;
            y0 = r0 * mh / d;
            x0 = c0 * mw / d;
        }
    }
    jpeg_destroy_decompress(&cinfo);
    int ok;
    if (sub != NULL) {
        ok = decode_plain(sub, sub_size, denom, top - y0, left - x0, bottom - y0, right - x0, out);
        free(sub);
    } else {
        ok = decode_plain(data, size, denom, top, left, bottom, right, out);
    }
    return ok;
}

static PyObject *crop(PyObject *self, PyObject *args) {
    Py_buffer buf;
    long top, left, height, width;
    int denom;
    if (!PyArg_ParseTuple(args, "y*lllli", &buf, &top, &left, &height, &width, &denom))
        return NULL;
    if (top < 0 || left < 0 || height <= 0 || width <= 0 || !(denom == 1 || denom == 2 || denom == 4 || denom == 8)) {
        PyBuffer_Release(&buf);
        PyErr_Format(PyExc_ValueError, "bad rectangle (%ld, %ld, %ld, %ld) or denom %d (1, 2, 4 or 8)", top, left,
                     height, width, denom);
        return NULL;
    }
    JDIMENSION t = (JDIMENSION)top, l = (JDIMENSION)left, b = (JDIMENSION)(top + height), r = (JDIMENSION)(left + width);
    PyObject *out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(b - t) * (r - l) * 3);
    if (out == NULL) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    int ok;
    unsigned char *dst = (unsigned char *)PyByteArray_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    ok = decode_rect(buf.buf, (size_t)buf.len, denom, t, l, b, r, dst);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    if (!ok) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    return out;
}

/* restart(data) -> the same JPEG (the same DCT coefficients and tables of quantization, so the same pixels)
 * rewritten baseline with a restart marker after every MCU and optimized Huffman tables; None for a file
 * crop() does not take. What tools/make_shards.py --restart-markers stores. */
static PyObject *restart(PyObject *self, PyObject *args) {
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "y*", &buf))
        return NULL;
    struct jpeg_decompress_struct src;
    struct jpeg_compress_struct dst;
    error_mgr err;
    unsigned char *volatile outbuf = NULL;
    unsigned long outsize = 0;
    volatile int ok = 0, dst_made = 0;
    init(&src, &err);
    Py_BEGIN_ALLOW_THREADS
    if (setjmp(err.jump) == 0 && open_header(&src, buf.buf, (size_t)buf.len)) {
        jvirt_barray_ptr *coefs = jpeg_read_coefficients(&src);
        dst.err = &err.pub;
        jpeg_create_compress(&dst);
        dst_made = 1;
        /* libjpeg mallocs the output into outbuf (kept across a longjmp: volatile), freed below either way */
        jpeg_mem_dest(&dst, (unsigned char **)&outbuf, &outsize);
        jpeg_copy_critical_parameters(&src, &dst);
        dst.restart_interval = 1;
        dst.optimize_coding = TRUE;
        jpeg_write_coefficients(&dst, coefs);
        jpeg_finish_compress(&dst);
        ok = 1;
    }
    Py_END_ALLOW_THREADS
    if (dst_made)
        jpeg_destroy_compress(&dst);
    jpeg_destroy_decompress(&src);
    PyBuffer_Release(&buf);
    if (!ok) {
        free(outbuf);
        Py_RETURN_NONE;
    }
    PyObject *result = PyBytes_FromStringAndSize((const char *)outbuf, (Py_ssize_t)outsize);
    free(outbuf);
    return result;
}

static PyMethodDef methods[] = {
    {"restart", restart, METH_VARARGS,
     "restart(data) -> the JPEG losslessly rewritten with a restart marker after every MCU, or None"},
    {"size", size, METH_VARARGS, "size(data) -> (height, width) of a JPEG this module decodes, or None"},
    {"crop", crop, METH_VARARGS,
     "crop(data, top, left, height, width, denom) -> RGB bytearray of the rectangle at 1/denom scale, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg", "libjpeg-turbo's partial decode", -1, methods};

PyMODINIT_FUNC PyInit__jpeg(void) { return PyModule_Create(&module); }
