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
static int decode_rect(const unsigned char *data, size_t size, int denom, JDIMENSION top, JDIMENSION left,
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

static PyMethodDef methods[] = {
    {"size", size, METH_VARARGS, "size(data) -> (height, width) of a JPEG this module decodes, or None"},
    {"crop", crop, METH_VARARGS,
     "crop(data, top, left, height, width, denom) -> RGB bytearray of the rectangle at 1/denom scale, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg", "libjpeg-turbo's partial decode", -1, methods};

PyMODINIT_FUNC PyInit__jpeg(void) { return PyModule_Create(&module); }
