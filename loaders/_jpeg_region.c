/* Region JPEG decode (libjpeg-turbo's libjpeg API): decode only the rows and columns a sample's
 * views need, at scale 1/d.
 *
 * decode_region(data, d, top, left, height, width, out, stride) -> (y0, x0, h, w)
 *
 *   data                      a baseline or progressive JPEG (bytes-like)
 *   d                         1, 2, 4 or 8: libjpeg's scaled IDCT (output ceil(H/d) x ceil(W/d))
 *   top, left, height, width  the wanted region on that scaled output
 *   out, stride               a writable buffer (e.g. a reused uint8 [rows, cols, 3] array) that
 *                             receives row r of the region at byte r * stride, 3 bytes (RGB) per
 *                             pixel; stride must hold width + 2 iMCU widths (32 px is always enough)
 *   y0, x0, h, w              the region written: y0 == top, h == height (rows are exact);
 *                             x0 <= left and x0 + w >= left + width (columns widen to libjpeg's
 *                             iMCU boundary: jpeg_crop_scanline)
 *
 * Work saved against a full decode: rows above `top` are entropy-decoded only
 * (jpeg_skip_scanlines: no dequantisation, IDCT, upsampling or colour conversion); columns outside
 * [x0, x0 + w) get no IDCT/upsampling/colour conversion (jpeg_crop_scanline); rows below
 * top + height are not decoded at all (the decoder stops there: jpeg_abort_decompress).
 * Decoding settings are libjpeg's defaults (ISLOW IDCT, fancy upsampling): those of simplejpeg's
 * and OpenCV's full decode. Their pixels equal the full decode's inside the region except next to
 * an iMCU-aligned cut column (fancy upsampling treats the cut as an image edge): callers ask for
 * one column more on each side (loaders/decode.py) and get pixels identical to the full decode.
 *
 * Any libjpeg error *or warning* (corrupt or truncated data) raises ValueError naming it; the
 * caller then decodes the sample by its full path, which reports or skips it as it always did.
 * The GIL is released while decoding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} region_error_mgr;

static void region_error_exit(j_common_ptr cinfo)
{
    region_error_mgr *err = (region_error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void region_emit_message(j_common_ptr cinfo, int msg_level)
{
    if (msg_level < 0)  /* a warning (corrupt data): an error here, see the header comment */
        region_error_exit(cinfo);
}

static void region_output_message(j_common_ptr cinfo)
{
    (void)cinfo;  /* never print */
}

/* Decode into pixels (capacity bytes, rows stride bytes apart); 0, or -1 with msg set. Runs
 * without the GIL: no Python calls. */
static int decode(const unsigned char *data, unsigned long size, int d,
                  long top, long left, long height, long width,
                  unsigned char *pixels, size_t capacity, size_t stride,
                  long *y0, long *x0, long *out_w, char *msg, size_t msg_len)
{
    struct jpeg_decompress_struct cinfo;
    region_error_mgr jerr;

    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = region_error_exit;
    jerr.pub.emit_message = region_emit_message;
    jerr.pub.output_message = region_output_message;
    jerr.message[0] = '\0';
    if (setjmp(jerr.jump)) {
        snprintf(msg, msg_len, "%s", jerr.message[0] ? jerr.message : "libjpeg error");
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE &&
        cinfo.jpeg_color_space != JCS_RGB) {
        snprintf(msg, msg_len, "JPEG colour space %d is not decoded to RGB here", (int)cinfo.jpeg_color_space);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)d;
    jpeg_start_decompress(&cinfo);

    long H = (long)cinfo.output_height, W = (long)cinfo.output_width;
    if (top < 0 || left < 0 || height <= 0 || width <= 0 || top + height > H || left + width > W) {
        snprintf(msg, msg_len, "region (top %ld, left %ld, %ld x %ld) is outside the %ld x %ld image at 1/%d",
                 top, left, height, width, H, W, d);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    JDIMENSION xoff = (JDIMENSION)left, cw = (JDIMENSION)width;
    if (xoff > 0 || cw < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &xoff, &cw);
    /* cinfo.output_width is now the cropped width */
    if ((size_t)cinfo.output_width * 3 > stride || (size_t)(height - 1) * stride + (size_t)cinfo.output_width * 3 > capacity) {
        snprintf(msg, msg_len, "a %ld x %lu region does not fit the output buffer (%zu bytes, row stride %zu)",
                 height, (unsigned long)cinfo.output_width, capacity, stride);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    if (top > 0) {
        JDIMENSION skipped = jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
        if ((long)skipped != top) {
            snprintf(msg, msg_len, "skipped %lu of %ld rows", (unsigned long)skipped, top);
            jpeg_destroy_decompress(&cinfo);
            return -1;
        }
    }
    long row = 0;
    while (row < height) {
        JSAMPROW rows[16];
        long want = height - row < 16 ? height - row : 16;
        for (long k = 0; k < want; k++)
            rows[k] = pixels + (size_t)(row + k) * stride;
        JDIMENSION got = jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)want);
        if (got == 0) {
            snprintf(msg, msg_len, "no rows decoded at row %ld", top + row);
            jpeg_destroy_decompress(&cinfo);
            return -1;
        }
        row += (long)got;
    }
    *y0 = top;
    *x0 = (long)xoff;
    *out_w = (long)cinfo.output_width;
    jpeg_abort_decompress(&cinfo);  /* stop here: the rows below are never decoded */
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

static PyObject *decode_region(PyObject *self, PyObject *args)
{
    Py_buffer buf, out;
    int d;
    long top, left, height, width;
    Py_ssize_t stride;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*illllw*n", &buf, &d, &top, &left, &height, &width, &out, &stride))
        return NULL;
    char msg[JMSG_LENGTH_MAX + 160];
    long y0 = 0, x0 = 0, w = 0;
    int rc;
    msg[0] = '\0';
    if (d != 1 && d != 2 && d != 4 && d != 8) {
        snprintf(msg, sizeof(msg), "scale denominator must be 1, 2, 4 or 8, got %d", d);
        rc = -1;
    } else if (stride <= 0) {
        snprintf(msg, sizeof(msg), "row stride must be positive, got %zd", stride);
        rc = -1;
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = decode((const unsigned char *)buf.buf, (unsigned long)buf.len, d, top, left, height, width,
                    (unsigned char *)out.buf, (size_t)out.len, (size_t)stride, &y0, &x0, &w, msg, sizeof(msg));
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&buf);
    PyBuffer_Release(&out);
    if (rc != 0) {
        PyErr_SetString(PyExc_ValueError, msg);
        return NULL;
    }
    return Py_BuildValue("(llll)", y0, x0, height, w);
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, d, top, left, height, width, out, stride) -> (y0, x0, h, w): the RGB region "
     "of a JPEG decoded at scale 1/d into the writable buffer out, rows stride bytes apart "
     "(see loaders/_jpeg_region.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__jpeg_region(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL)
        PyModule_AddIntConstant(m, "LIBJPEG_VERSION", JPEG_LIB_VERSION);
    return m;
}
